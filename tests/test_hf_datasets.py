"""Hugging Face datasets as training data: Parquet (a file, a folder, a folder laid out as a Hub dataset
repo with its README metadata), save_to_disk folders, streams. Each gives the batches that the same
rows give as a TSV; a streamed run is split across processes and resumes after SIGKILL where its
checkpoint stood; bad data is named in one line. Everything is built here, offline."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import noise_image
from fake_hub import write_dataset_repo
from test_cli import assert_one_line_error, in_process
from test_distributed import free_port
from test_sharded import EXAMPLES

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("offline_datasets")

from datasets.distributed import split_dataset_by_node  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from flaminko.data import FlaminkoCollator  # noqa: E402
from flaminko.hf_datasets import CaptionRows, StreamedCaptions, load_source  # noqa: E402
from flaminko.training import DataArguments, FlaminkoTrainer, load_datasets  # noqa: E402

ROWS = 24


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The same rows as a TSV and in every datasets form; row 3 has a broken image, row 5 an empty caption."""
    root = tmp_path_factory.mktemp("hf-datasets")
    (root / "images").mkdir()
    images, captions = [], []
    for row in range(ROWS):
        data = b"\x89PNG not really" if row == 3 else png_bytes(noise_image(row, (24 + row % 3, 24)))
        (root / "images" / f"{row}.png").write_bytes(data)
        images.append(data)
        captions.append("" if row == 5 else f"빨간색 네모 {row}")
    lines = ["image\tcaption"] + [f"images/{row}.png\t{captions[row]}" for row in range(ROWS)]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    cells = [{"bytes": data, "path": f"{row}.png"} for row, data in enumerate(images)]
    table = datasets.Dataset.from_dict({"image": cells, "caption": captions}, features=features)
    table.to_parquet(str(root / "captions.parquet"))
    table.save_to_disk(str(root / "saved"))
    shards = [table.select(range(12)), table.select(range(12, ROWS))]
    write_dataset_repo(root / "hub", {"train": shards, "validation": [table.select(range(4))]}, config_name="ko")
    paths = datasets.Dataset.from_dict({"file_name": [f"images/{row}.png" for row in range(ROWS)], "text": captions})
    paths.to_parquet(str(root / "paths.parquet"))  # image paths relative to the file, under other column names
    return root


def first_batches(dataset, model_and_processor, tmp_path, count=3):
    """The batches the Trainer trains on first: its own dataloader, seed 0, batch size 4."""
    model, processor = model_and_processor
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, seed=0, use_cpu=True,
                             report_to="none", remove_unused_columns=False, max_steps=count)
    trainer = FlaminkoTrainer(model=model, args=args, train_dataset=dataset, data_collator=FlaminkoCollator(processor))
    loader = iter(trainer.get_train_dataloader())
    return [next(loader) for _ in range(count)]


def read(source, **options):
    arguments = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", max_steps=3)
    return load_datasets(DataArguments(train_data=str(source), **options), arguments)[0]


@pytest.mark.parametrize("form", ["captions.parquet", "saved", "hub", "paths.parquet"])
def test_every_form_gives_the_batches_of_the_same_rows_as_a_tsv(form, forms, model_and_processor, tmp_path, capsys):
    table = read(forms / "captions.tsv")
    options = {"config": "ko"} if form == "hub" else {}
    rows = read(forms / form, **options)
    report = capsys.readouterr().out
    assert isinstance(rows, CaptionRows) and len(rows) == len(table) == ROWS - 2
    assert "skipped 1 unreadable image (row 3), 1 empty caption (row 5)" in report
    expected = first_batches(table, model_and_processor, tmp_path / "tsv")
    for got, want in zip(first_batches(rows, model_and_processor, tmp_path / "hf"), expected):
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_a_stream_reads_the_rows_in_order_and_splits_them_across_processes(forms):
    source = str(forms / "hub")
    stream = load_source(source, split="train", config="ko", streaming=True, option="--train_data", split_option="--split")
    whole = StreamedCaptions(stream, source=source)
    texts = [sample["text"] for sample in whole]
    assert texts == [f"<image>빨간색 네모 {row}<|endofchunk|>" for row in range(ROWS) if row not in (3, 5)]
    assert whole.skipped == {"unreadable image": 1, "empty caption": 1} and whole.skipped.rows["unreadable image"] == [3]
    parts = []
    for rank in range(2):
        part = split_dataset_by_node(stream, rank=rank, world_size=2)
        parts.append([sample["text"] for sample in StreamedCaptions(part, source=source)])
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(texts)


def test_a_stream_continues_from_a_saved_state_and_starts_afresh_on_the_next_pass(forms, tmp_path):
    source = str(forms / "captions.parquet")
    stream = load_source(source, split="train", streaming=True, option="--train_data", split_option="--split")
    first = StreamedCaptions(stream, source=source)
    seen = []
    for sample in first:
        seen.append(sample["text"])
        if len(seen) == 7:
            (tmp_path / "stream-state-rank0.json").write_text(json.dumps(sample["stream_state"]))
            break
    rest = StreamedCaptions(load_source(source, split="train", streaming=True, option="--train_data", split_option="--split"), source=source)
    rest.resume(tmp_path, rank=0)
    after = [sample["text"] for sample in rest]
    assert seen + after == [sample["text"] for sample in StreamedCaptions(stream, source=source)]
    assert len([sample["text"] for sample in rest]) == ROWS - 2  # the next pass is whole again
    with pytest.raises(ValueError, match="no stream position for this process"):
        rest.resume(tmp_path, rank=1)


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing column", ["--text_column sentence:", "has no such column; its columns: image, caption"]),
        ("no usual column", ["has no image column (image / img / image_path / file_name); its columns: photo, caption", "--image_column"]),
        ("urls", ["--image_column image of", "holds URLs (row 0: https://example.com/0.jpg)", "downloads nothing"]),
        ("missing split", ["has no split 'test'; its splits: train, validation (choose with --split)"]),
        ("every row bad", ["--train_data", "no usable rows (skipped: 2 unreadable image (rows 0, 1))"]),
        ("caption lists", ["--text_column caption of", "holds lists of captions (row 0)"]),
        ("streaming a table", ["--streaming reads a Hugging Face dataset given as --train_data"]),
        ("streaming without max_steps", ["A stream has no length to count epochs by: give --max_steps"]),
    ],
)
def test_bad_data_is_one_line_naming_the_problem(case, fragments, forms, backbones, tmp_path, capsys):
    source, extra = forms / "captions.parquet", []
    if case == "missing column":
        extra = ["--text_column", "sentence"]
    elif case == "no usual column":
        source = tmp_path / "photo.parquet"
        datasets.Dataset.from_dict({"photo": ["a.png"], "caption": ["x"]}).to_parquet(str(source))
    elif case == "urls":
        source = tmp_path / "urls.parquet"
        datasets.Dataset.from_dict({"image": [f"https://example.com/{i}.jpg" for i in range(2)], "caption": ["x", "y"]}).to_parquet(str(source))
    elif case == "missing split":
        source, extra = forms / "hub", ["--config", "ko", "--split", "test"]
    elif case == "every row bad":
        source = tmp_path / "bad"
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        cells = [{"bytes": b"not an image", "path": None}] * 2
        datasets.Dataset.from_dict({"image": cells, "caption": ["x", "y"]}, features=features).save_to_disk(str(source))
    elif case == "caption lists":
        source = tmp_path / "lists.parquet"
        datasets.Dataset.from_dict({"image": ["a.png"], "caption": [["x", "y"]]}).to_parquet(str(source))
    elif case == "streaming a table":
        source, extra = forms / "captions.tsv", ["--streaming"]
    elif case == "streaming without max_steps":
        extra = ["--streaming"]
    out = tmp_path / "run"
    arguments = ["--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"], "--output_dir", out, "--use_cpu"]
    result = in_process(capsys, "train", *arguments, "--train_data", source, *extra)
    result.stderr = result.stderr.strip().splitlines()[-1] + "\n"  # after datasets' own progress bars
    assert_one_line_error(result, "train", *fragments)
    assert not out.exists()


def test_without_the_datasets_package_one_line_says_to_install_it(forms, backbones, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails, as where it is not installed
    result = in_process(
        capsys, "train", "--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"],
        "--output_dir", tmp_path / "run", "--train_data", forms / "captions.parquet",
    )  # fmt: skip
    assert_one_line_error(result, "train", "need the datasets package: pip install datasets")


RECORDED_TRAIN = textwrap.dedent(
    """
    # `flaminko train` (the arguments after RECORD KILL_AT), recording in RECORD, per process: the captions of
    # each batch as the stream gives it (read-rankN.jsonl) and as it is trained (trained-rankN.jsonl), and
    # the trainable weights at the end (weights-rankN.safetensors). KILL_AT > 0: a process at the end of that
    # step sends itself a SIGKILL, as from outside (under a launcher, the launcher then ends the others).
    import json, os, signal, sys
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from flaminko import cli, training
    from flaminko.data import FlaminkoCollator

    record, kill_at = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))

    def log(name, captions):
        with open(f"{record}/{name}-rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps(captions, ensure_ascii=False) + "\\n")

    collate = FlaminkoCollator.__call__
    def collate_and_name(self, samples):
        batch = collate(self, samples)
        batch["captions"] = [sample["text"] for sample in samples]
        log("read", batch["captions"])
        return batch
    FlaminkoCollator.__call__ = collate_and_name

    step = training.FlaminkoTrainer.training_step
    def logged_step(self, model, inputs, num_items_in_batch=None):
        log("trained", inputs.pop("captions"))
        return step(self, model, inputs, num_items_in_batch)
    training.FlaminkoTrainer.training_step = logged_step

    class KillAndKeep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
            save_file(weights, f"{record}/weights-rank{rank}.safetensors")

    init = training.FlaminkoTrainer.__init__
    def with_callback(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(KillAndKeep())
    training.FlaminkoTrainer.__init__ = with_callback
    cli.main(sys.argv[3:])
    """
)


def recorded(record, name="trained", rank=0):
    """The batches' captions that process `rank` recorded, one list a batch."""
    return [json.loads(line) for line in (record / f"{name}-rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()]


def recorded_run(launcher, script, backbones, source, out, *, record, kill_at=0, options=()):
    """`flaminko train --streaming` on `source` through RECORDED_TRAIN under `launcher` (the command before
    the script); the finished process."""
    record.mkdir(parents=True)
    arguments = [
        "train", "--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"], "--train_data", source,
        "--streaming", "--output_dir", out, "--learning_rate", "5e-3", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "true", *options,
    ]  # fmt: skip
    # The datasets cache in the test's folder and the Hub unreachable, as offline_datasets makes them in this process.
    environment = {**os.environ, "HF_DATASETS_CACHE": str(record / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [*launcher, str(script), str(record), str(kill_at), *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)


@pytest.fixture(scope="module")
def recorded_train(tmp_path_factory):
    script = tmp_path_factory.mktemp("script") / "recorded_train.py"
    script.write_text(RECORDED_TRAIN)
    return script


def test_a_streamed_run_killed_and_resumed_reads_on_from_its_checkpoint(backbones, forms, recorded_train, tmp_path):
    from safetensors.torch import load_file

    one_process = [sys.executable]
    options = ["--max_steps", "5", "--save_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu"]

    def run(out, record, **kwargs):
        return recorded_run(one_process, recorded_train, backbones, forms / "captions.parquet", out, record=record, options=options, **kwargs)

    whole = run(tmp_path / "whole", tmp_path / "whole-record")
    assert whole.returncode == 0, whole.stderr[-3000:]
    batches = recorded(tmp_path / "whole-record")
    captions = [caption for batch in batches for caption in batch]
    assert len(batches) == 5 and len(set(captions)) == len(captions) == 20  # one pass: every row once

    killed = tmp_path / "killed"
    job = run(killed, tmp_path / "killed-record", kill_at=3)
    assert job.returncode == -signal.SIGKILL, job.stderr[-3000:]
    assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2"] and not (killed / "final").exists()
    assert (killed / "checkpoint-2" / "stream-state-rank0.json").is_file()
    options += ["--resume_from_checkpoint", str(killed / "checkpoint-2")]
    resumed = run(killed, tmp_path / "resumed-record")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = recorded(tmp_path / "killed-record")[:2], recorded(tmp_path / "resumed-record")
    assert before + after == batches  # the steps before checkpoint-2, then on from it: no example twice
    assert recorded(tmp_path / "resumed-record", "read")[0] == batches[2]  # the stream was not read again from its start
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


# Two processes, as a user launches them: accelerate with the DDP example config (torchrun underneath; gloo
# here, --use_cpu keeping it on the CPU where there is a GPU too). captions.parquet is one file, so each
# process reads every other row: rank 0 the 12 even rows, 6 batches of 2; rank 1 the 10 good odd ones
# (rows 3 and 5 are bad), 5 batches. 8 steps take rank 1 past the end of its part and rank 0 not;
# checkpoint-5 holds rank 1 at the very end of its part, rank 0 in the middle of its own.
TWO_PROCESS_OPTIONS = ["--max_steps", "8", "--save_steps", "5", "--per_device_train_batch_size", "2", "--use_cpu"]
FIRST_PASS_BATCHES = {0: 6, 1: 5}


def two_processes():
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate_ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_process_run(backbones, forms, recorded_train, tmp_path_factory):
    """(output folder, record folder, finished launcher) of an uninterrupted streamed run on two processes."""
    root = tmp_path_factory.mktemp("two-processes")
    out, record = root / "out", root / "record"
    result = recorded_run(two_processes(), recorded_train, backbones, forms / "captions.parquet", out, record=record, options=TWO_PROCESS_OPTIONS)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, record, result


def test_two_processes_stream_disjoint_parts_that_make_one_pass_and_train_as_one_ddp_run(two_process_run):
    from safetensors.torch import load_file

    out, record, result = two_process_run
    batches = {rank: recorded(record, rank=rank) for rank in (0, 1)}
    assert [len(batches[rank]) for rank in (0, 1)] == [8, 8]  # a batch from each process every step
    first_pass = {rank: [caption for batch in batches[rank][: FIRST_PASS_BATCHES[rank]] for caption in batch] for rank in (0, 1)}
    assert not set(first_pass[0]) & set(first_pass[1])
    good_rows = [f"<image>빨간색 네모 {row}<|endofchunk|>" for row in range(ROWS) if row not in (3, 5)]
    assert sorted(first_pass[0] + first_pass[1]) == sorted(good_rows)  # together every row once: no example twice
    for rank in (0, 1):  # a process at the end of its part reads it again from its start, the other reading on
        again = batches[rank][FIRST_PASS_BATCHES[rank] :]
        assert again == batches[rank][: len(again)]
    assert sorted(path.name for path in (out / "checkpoint-5").glob("stream-state-rank*.json")) == [
        "stream-state-rank0.json", "stream-state-rank1.json",
    ]  # fmt: skip
    # Different rows, the same weights: each step averaged both processes' gradients.
    rank0, rank1 = load_file(record / "weights-rank0.safetensors"), load_file(record / "weights-rank1.safetensors")
    start = load_file(out / "base-model" / "model.safetensors")
    assert rank0.keys() == rank1.keys() and any(not torch.equal(rank0[name], start[name]) for name in rank0 if name in start)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert result.stdout.count("saved to") == 1


def test_two_processes_killed_and_resumed_read_on_each_from_its_own_position(two_process_run, backbones, forms, recorded_train, tmp_path):
    from safetensors.torch import load_file

    whole_out, whole_record, _ = two_process_run
    out = tmp_path / "out"

    def run(record, *options, kill_at=0):
        options = [*TWO_PROCESS_OPTIONS, *options]
        return recorded_run(two_processes(), recorded_train, backbones, forms / "captions.parquet", out, record=record, kill_at=kill_at, options=options)

    killed = run(tmp_path / "killed", kill_at=6)
    assert killed.returncode != 0 and not (out / "final").exists(), killed.stderr[-4000:]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-5"]
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", out / "checkpoint-5")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        whole = recorded(whole_record, rank=rank)
        # The five steps checkpoint-5 holds, then on from there: the killed run's sixth step is trained
        # again (its update died with the run), so no example is skipped and none is trained twice.
        assert recorded(tmp_path / "killed", rank=rank)[:5] + recorded(tmp_path / "resumed", rank=rank) == whole
    # Rank 0 was saved mid-part: the resumed run's first read is its sixth batch, not its part's start.
    assert recorded(tmp_path / "resumed", "read", rank=0)[0] == recorded(whole_record, rank=0)[5] != recorded(whole_record, rank=0)[0]
    a, b = load_file(whole_out / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
