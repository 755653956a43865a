"""The `flaminko` console script as a user meets it: user mistakes end in one line
`flaminko <cmd>: error: ...` and exit status 2, never a traceback; --debug shows it; Ctrl-C ends
quietly; train checks before it builds, prints its losses and cleans up; caption takes files,
folders and globs and writes TSV/JSONL; chat prompts a trained model in its recorded format."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import solid

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = shutil.which("flaminko")
HAS_ACCELERATOR = torch.cuda.is_available() or torch.backends.mps.is_available()


def flaminko(*args, env=None, timeout=300, **options):
    """Runs the installed console script on this checkout's code."""
    command = [CONSOLE_SCRIPT] if CONSOLE_SCRIPT else [sys.executable, "-m", "flaminko.cli"]
    inherited = {key: value for key, value in os.environ.items() if key != "FLAMINKO_DEBUG"}
    environment = {**inherited, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=environment, timeout=timeout, **options)


def in_process(capsys, *args):
    """The same entry point in this process (the console script calls flaminko.cli.main): for the
    many cases of one item, where a fresh interpreter per case would only repeat the imports."""
    from flaminko.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(argument) for argument in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err)


def assert_one_line_error(result, command, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"flaminko {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def closed_port_endpoint() -> str:
    """An address where nothing listens: connections are refused at once, as on a machine offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_table(folder: Path, rows: list[tuple[str, str]], header=("image", "caption")) -> Path:
    lines = ["\t".join(header)] + [f"{image}\t{caption}" for image, caption in rows]
    (folder / "t.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "t.tsv"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index, colour in enumerate(("red", "blue", "green")):
        solid(colour, size=(32, 32)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def trained(backbones, images, tmp_path_factory):
    """A run of `flaminko train` from the tiny backbones: (result, run folder)."""
    out = tmp_path_factory.mktemp("train") / "runs" / "ko"
    table = write_table(images, [(f"{i % 3}.png", caption) for i, caption in enumerate(["빨간색 네모", "파란색 네모", "초록색 네모"] * 4)])
    result = flaminko(
        "train", "--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"], "--train_data", table,
        "--eval_fraction", "0.25", "--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
        "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    )
    return result, out


def test_help_is_quick_to_reach_and_train_help_lists_flaminko_options_first(tmp_path):
    top = flaminko("--help")
    assert top.returncode == 0 and all(name in top.stdout for name in ("demo", "caption", "chat", "serve", "release", "train", "--debug"))
    cache = tmp_path / "cache"
    train = flaminko("train", "--help", env={"XDG_CACHE_HOME": cache})
    assert train.returncode == 0, train.stderr[-2000:]
    assert train.stdout.startswith("usage: flaminko train ")
    groups = [train.stdout.index(title) for title in ("Flaminko: the model:", "Flaminko: the data:", "The Trainer's own options")]
    assert groups == sorted(groups)
    assert train.stdout.index("--train_data") < train.stdout.index("--learning_rate")
    # Rendered once (it imports TrainingArguments, hence torch), then read back from the cache.
    (kept,) = (cache / "flaminko").glob("train-help-*.txt")
    assert kept.read_text(encoding="utf-8") == train.stdout
    kept.write_text("usage: flaminko train (kept)\n", encoding="utf-8")
    again = flaminko("train", "--output_dir", "x", "-h", env={"XDG_CACHE_HOME": cache})
    assert again.returncode == 0 and again.stdout == "usage: flaminko train (kept)\n"


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    assert_one_line_error(flaminko("release", folder, "--repo-id", "me/x"), "release", "not a model folder")
    shown = flaminko("release", folder, "--repo-id", "me/x", "--debug")
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "not a model folder" in shown.stderr
    from_environment = flaminko("release", folder, "--repo-id", "me/x", env={"FLAMINKO_DEBUG": "1"})
    assert from_environment.returncode == 1 and "Traceback" in from_environment.stderr


def test_demo_refuses_a_step_count_below_one(tmp_path, capsys):
    assert_one_line_error(in_process(capsys, "demo", "--steps", "0", "--out", tmp_path / "demo"), "demo", "--steps must be at least 1")
    assert not (tmp_path / "demo").exists()


def test_argument_errors_are_argparse_one_liners():
    result = flaminko("caption", "x.png")
    assert result.returncode == 2 and "the following arguments are required: --model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--model", "runs/ko/final"], ["--model runs/ko/final: no such folder, and not a Hub model id"]),
        (["--model", "{images}/0.png"], ["a file, but a model folder"]),
        (["--model", "{images}"], ["without config.json, not a model folder"]),
        (["--model", "{images}", "--output", "captions.txt"], ["--output captions.txt: give a .tsv or .jsonl file"]),
        (["--model", "{images}", "--prompt", "no placeholder"], ["--prompt must hold exactly one <image>"]),
        (["--model", "{images}", "--device", "nosuchdevice"], ["--device nosuchdevice: not a device name"]),
    ],
)
def test_caption_mistakes(images, capsys, arguments, fragments):
    arguments = [argument.format(images=images) for argument in arguments]
    assert_one_line_error(in_process(capsys, "caption", *arguments, images / "0.png"), "caption", *fragments)


def test_caption_mistake_through_the_console_script(images, tmp_path):
    assert_one_line_error(flaminko("caption", "--model", "runs/ko/final", images), "caption", "no such folder, and not a Hub model id")


def test_caption_of_missing_images_and_empty_folders(images, tmp_path, capsys):
    result = in_process(capsys, "caption", "--model", images, tmp_path / "nope.png")
    assert_one_line_error(result, "caption", "nope.png: no such file or folder")
    assert_one_line_error(in_process(capsys, "caption", "--model", images, tmp_path), "caption", "a folder without images")


def test_unreachable_hub_is_one_line_naming_offline_mode(images, tmp_path):
    cache = {"HF_HOME": str(tmp_path / "hf")}
    refused = flaminko("caption", "--model", "someorg/somemodel", images, env={**cache, "HF_ENDPOINT": closed_port_endpoint()})
    assert_one_line_error(refused, "caption", "cannot reach the Hub", "HF_HUB_OFFLINE=1")
    offline = flaminko("caption", "--model", "someorg/somemodel", images, env={**cache, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(offline, "caption", "not in the local Hub cache")


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing table", ["--train_data", "no such file"]),
        ("wrong columns", ["needs 'caption' and 'image' columns"]),
        ("every row skipped", ["no usable rows", "missing image file"]),
        ("unknown format", ["--data_format must be one of"]),
        ("bad fraction", ["--eval_fraction must be in [0, 1)"]),
        ("bad word noise", ["--word_noise must be in [0, 1]"]),
        ("bad overrides", ["--config_overrides is not valid JSON"]),
        ("bf16 without a GPU", ["--bf16", "--use_cpu"]),
        ("fp16 on the CPU", ["--fp16 needs a GPU"]),
    ],
)
def test_train_checks_before_it_builds_or_writes(backbones, images, tmp_path, capsys, case, fragments):
    if case in ("bf16 without a GPU", "fp16 on the CPU") and HAS_ACCELERATOR:
        pytest.skip("this machine has a GPU")
    table = write_table(images, [("0.png", "빨간색 네모")] * 2)
    options = {"--train_data": table}
    extra = []
    if case == "missing table":
        options["--train_data"] = tmp_path / "nope.tsv"
    elif case == "wrong columns":
        options["--train_data"] = write_table(tmp_path, [("0.png", "빨간색 네모")], header=("file", "text"))
    elif case == "every row skipped":
        options["--train_data"] = write_table(tmp_path, [("missing.png", "빨간색 네모")] * 3)
    elif case == "unknown format":
        extra = ["--data_format", "parquet"]
    elif case == "bad fraction":
        extra = ["--eval_fraction", "1.5"]
    elif case == "bad word noise":
        extra = ["--word_noise", "-0.1"]
    elif case == "bad overrides":
        extra = ["--config_overrides", "{freeze"]
    elif case == "bf16 without a GPU":
        extra = ["--bf16"]
    elif case == "fp16 on the CPU":
        extra = ["--fp16", "--use_cpu"]
    out = tmp_path / "run"
    arguments = ["--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"], "--output_dir", out]
    result = in_process(capsys, "train", *arguments, *[x for pair in options.items() for x in pair], *extra)
    assert_one_line_error(result, "train", *fragments)
    assert not out.exists()  # nothing built, nothing saved


def test_train_mistake_through_the_console_script(backbones, tmp_path):
    table = write_table(tmp_path, [("missing.png", "빨간색 네모")] * 3)
    out = tmp_path / "run"
    result = flaminko(
        "train", "--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"], "--train_data", table,
        "--output_dir", out,
    )
    assert_one_line_error(result, "train", "--train_data", "no usable rows (skipped: 3 missing image file)")
    assert not out.exists()


def test_train_prints_losses_cleans_up_and_records_its_prompt_format(trained):
    result, out = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("train loss ") for line in lines), result.stdout[-2000:]
    assert any(line.startswith("eval loss ") and "3 held-out samples" in line for line in lines), result.stdout[-2000:]
    assert "'loss':" in result.stdout  # the Trainer's own log lines, as it goes
    assert not (out / "checkpoint-staging").exists()
    assert (out / "checkpoint-2").is_dir()
    final = out / "final"
    assert (final / "chat_template.jinja").is_file()
    from flaminko.release import problems

    assert problems(final) == []  # remote code and auto_map written by the console script too
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model is None  # the backbones were local folders: no path in the metadata
    assert card.text.strip().splitlines()[0] == "# ko" and "pip install flaminko" not in card.text
    assert "Nothing to install" in card.text


def test_caption_takes_files_folders_and_globs_and_writes_tsv_and_jsonl(trained, images, tmp_path):
    _, out = trained
    final = out / "final"
    result = flaminko(
        "caption", "--model", final, images, str(images / "1.*"), images / "2.png", "--batch_size", "2", "--num_beams", "1",
        "--max_new_tokens", "3", "--device", "cpu", "--dtype", "float32", "--output", tmp_path / "captions.jsonl",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = [str(images / f"{i}.png") for i in range(3)] + [str(images / "1.png"), str(images / "2.png")]
    assert [row["image"] for row in rows] == expected and all(isinstance(row["caption"], str) for row in rows)
    assert "captioning" in result.stderr  # the progress bar
    tsv = flaminko("caption", "--model", final, images / "0.png", "--num-beams", "1", "--max-new-tokens", "3")
    assert tsv.returncode == 0 and tsv.stdout.splitlines()[-1].startswith(f"{images / '0.png'}\t")


def test_chat_uses_the_recorded_format_and_ends_quietly(trained, images):
    _, out = trained
    script = f"/image {images / '0.png'}\n\n/image /no/such/file.png\n"
    result = flaminko("chat", "--model", out / "final", "--max_new_tokens", "3", input=script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained on image-text pairs" in result.stdout and "Assistant:" in result.stdout
    assert "error: Cannot read image file '/no/such/file.png'" in result.stdout
    assert "Traceback" not in result.stderr


def test_chat_shows_a_prompt_marker_on_a_terminal(trained):
    import pty

    _, out = trained
    command = [CONSOLE_SCRIPT] if CONSOLE_SCRIPT else [sys.executable, "-m", "flaminko.cli"]
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*command, "chat", "--model", str(out / "final")],
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(terminal)
    os.write(controller, b"/quit\n")
    stdout, stderr = process.communicate(timeout=300)
    os.close(controller)
    assert process.returncode == 0, stderr[-3000:]
    assert "\n> " in stdout, stdout


def test_ctrl_c_ends_quietly(trained):
    _, out = trained
    command = [CONSOLE_SCRIPT] if CONSOLE_SCRIPT else [sys.executable, "-m", "flaminko.cli"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [*command, "chat", "--model", str(out / "final")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        # As from a terminal: a suite started in the background of a non-interactive shell ignores
        # SIGINT, and a child that inherits that never sees the Ctrl-C this test sends.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout.readline().startswith("Type a message")  # loaded, waiting for input
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
