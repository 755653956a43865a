"""Training on two processes equals one process (invariant 11; FSDP2, which accelerate does not run on
the CPU, in test_sharded.py). `flaminko train` under
accelerate launch with the example configs (DDP, DeepSpeed ZeRO-2, ZeRO-3), two CPU processes over
gloo, against the same command in one process with the same global batch (2 x 4 = 1 x 8), data order
and seed: the losses of the first 5 steps agree within 1e-4, the trainable weights after them within
TRAINED_TOLERANCE, the frozen ones bit for bit.

TRAINED_TOLERANCE: each step's gradient is summed in another order (two halves, then all-reduced,
instead of one batch of 8), which moves it by float32 rounding (about 1e-7 relative). Adam divides each
gradient by its running size, so where a gradient is as small as its rounding error the rounding can move
that weight's step by up to the learning rate (1e-3); every process runs on one thread so that the thread
count, which splits a matrix product's sums, does not add to it. Measured: 1.3e-7 (DDP, ZeRO-2, ZeRO-3),
4.6e-7 (ZeRO-3 with LoRA); the tolerance is about twice the largest.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from flaminko import FlaminkoForConditionalGeneration

from test_distributed import free_port
from train_worker import GREEDY_PROMPT, NEW_TOKENS
from test_training import caption_table  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORKER = Path(__file__).with_name("train_worker.py")
STEPS, LOSS_TOLERANCE, TRAINED_TOLERANCE = 5, 1e-4, 1e-6
# LoRA without dropout, whose random masks differ between one process and two.
LORA = ("--use_lora", "--lora_dropout", "0")
# peft gathers trainable token rows onto CUDA under ZeRO-3 (flaminko train refuses it on the CPU), so the
# CPU comparison of LoRA keeps them frozen.
FROZEN_NEW_ROWS = ("--config_overrides", '{"train_new_token_embeddings": false}')

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra: pip install 'flaminko[deepspeed]'"
)
cpu_only = pytest.mark.skipif(
    torch.accelerator.is_available(), reason="the CPU path (--use_cpu); on GPUs accelerate runs the same configs without it"
)


def source_options(backbones, folder=None):
    if folder is not None:
        return ["--model_name_or_path", str(folder)]
    return ["--vision_model", str(backbones["vision"]), "--language_model", str(backbones["gpt_neox"])]


def run(out, table, source, *options, config=None, per_device_batch=8, steps=STEPS, save_steps=None, kill_at=0, record=None):
    """flaminko train through train_worker.py, in one process (config None) or two under accelerate
    launch; returns the record (losses, trainable names, whole final state dict, greedy tokens), or with
    kill_at the finished process."""
    record = record or out.with_suffix(".pt")
    saving = ["--save_steps", str(save_steps)] if save_steps else ["--save_strategy", "no"]
    arguments = [
        str(WORKER), str(record), str(kill_at), *source, "--train_data", str(table), "--output_dir", str(out),
        "--max_steps", str(steps), "--per_device_train_batch_size", str(per_device_batch), "--logging_steps", "1",
        *saving, "--learning_rate", "1e-3", "--seed", "0", "--report_to", "none", "--use_cpu", *options,
    ]
    if config is None:
        command = [sys.executable, *arguments]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(free_port()), *arguments,
        ]
    # The launched processes import flaminko as this one does. Every process runs on one thread: a matrix
    # product's sums are split by thread count, so the machine's core count would enter the comparison.
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parents[1]), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    if kill_at:
        return result
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(record)


def assert_equal_to_one_process(record, reference):
    assert len(reference["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(reference["losses"]), rtol=0, atol=LOSS_TOLERANCE)
    assert record["trainable"] == reference["trainable"] and record["state"].keys() == reference["state"].keys()
    state, expected = record["state"], reference["state"]
    for name in reference["trainable"]:
        torch.testing.assert_close(state[name], expected[name], rtol=0, atol=TRAINED_TOLERANCE, msg=lambda detail, name=name: f"{name}: {detail}")
    frozen = [name for name in expected if name not in reference["trainable"]]
    assert any("vision_model" in name for name in frozen) and any("language_model" in name for name in frozen)
    for name in frozen:
        assert torch.equal(state[name], expected[name]), f"frozen {name} differs"


@pytest.fixture(scope="module")
def one_process(backbones, caption_table, tmp_path_factory):  # noqa: F811
    """The reference runs, each made once: {kind: (record, output folder)}."""
    made = {}

    def reference(kind):
        if kind not in made:
            out = tmp_path_factory.mktemp("one-process") / kind
            options = {"backbones": [], "lora": [*LORA, *FROZEN_NEW_ROWS]}[kind]
            made[kind] = run(out, caption_table, source_options(backbones), *options), out
        return made[kind]

    return reference


@cpu_only
@pytest.mark.parametrize(
    "config",
    [
        "accelerate_ddp.yaml",
        pytest.param("accelerate_deepspeed_zero2.yaml", marks=needs_deepspeed),
        pytest.param("accelerate_deepspeed_zero3.yaml", marks=needs_deepspeed),
    ],
)
def test_two_processes_from_backbones_equal_one_process(config, backbones, caption_table, one_process, tmp_path):  # noqa: F811
    reference, reference_out = one_process("backbones")
    out = tmp_path / "out"
    record = run(out, caption_table, source_options(backbones), config=EXAMPLES / config, per_device_batch=4)
    assert_equal_to_one_process(record, reference)
    # The model built from the backbones (the new token rows set to the mean of the pretrained ones) is
    # one process's, bit for bit, and so is the start it saved.
    start, expected_start = load_file(out / "base-model" / "model.safetensors"), load_file(reference_out / "base-model" / "model.safetensors")
    assert start.keys() == expected_start.keys()
    assert all(torch.equal(start[name], expected_start[name]) for name in start)
    embedding = start["language_model.gpt_neox.embed_in.weight"]
    assert torch.isfinite(embedding).all() and torch.equal(embedding[-1], embedding[:-3].mean(0))
    # The final folder holds the whole trained model (under ZeRO-3 too, where each process holds slices).
    final, expected_final = load_file(out / "final" / "model.safetensors"), load_file(reference_out / "final" / "model.safetensors")
    assert final.keys() == expected_final.keys()
    for name, tensor in final.items():
        if torch.equal(expected_final[name], expected_start[name]):
            assert torch.equal(tensor, expected_final[name]), name
        else:
            torch.testing.assert_close(tensor, expected_final[name], rtol=0, atol=TRAINED_TOLERANCE, msg=lambda detail, name=name: f"{name}: {detail}")


@cpu_only
@needs_deepspeed
def test_zero3_without_zero3_init_from_a_flaminko_folder_equals_one_process(backbones, caption_table, one_process, tmp_path):  # noqa: F811
    """A folder saved by save_pretrained (as `flaminko convert` writes them), ZeRO-3 with zero3_init_flag false."""
    folder = one_process("backbones")[1] / "base-model"
    config = tmp_path / "zero3-no-init.yaml"
    config.write_text((EXAMPLES / "accelerate_deepspeed_zero3.yaml").read_text().replace("zero3_init_flag: true", "zero3_init_flag: false"))
    assert "zero3_init_flag: false" in config.read_text()
    reference = run(tmp_path / "one", caption_table, source_options(backbones, folder))
    record = run(tmp_path / "two", caption_table, source_options(backbones, folder), config=config, per_device_batch=4)
    assert_equal_to_one_process(record, reference)


@cpu_only
@needs_deepspeed
def test_zero3_with_lora_equals_one_process(backbones, caption_table, one_process, tmp_path):  # noqa: F811
    reference = one_process("lora")[0]
    options = [*LORA, *FROZEN_NEW_ROWS]
    record = run(tmp_path / "out", caption_table, source_options(backbones), *options, config=EXAMPLES / "accelerate_deepspeed_zero3.yaml", per_device_batch=4)
    assert any("lora_B" in name for name in record["trainable"])
    assert_equal_to_one_process(record, reference)
    # The adapter folder holds the trained adapter, gathered from both processes.
    adapter = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert adapter and all(tensor.numel() > 0 for tensor in adapter.values())


REMOTE_GREEDY = """
import sys
sys.modules["flaminko"] = None  # the package must not be importable here
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = processor(text=prompt, images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt")
print(model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)[0].tolist())
"""


@cpu_only
@needs_deepspeed
def test_zero3_saves_an_ordinary_folder_and_a_killed_run_resumes_to_the_same_weights(backbones, caption_table, tmp_path):  # noqa: F811
    config, source = EXAMPLES / "accelerate_deepspeed_zero3.yaml", source_options(backbones)
    whole = run(tmp_path / "whole", caption_table, source, config=config, per_device_batch=4, steps=4, save_steps=2)
    final = tmp_path / "whole" / "final"
    # An ordinary Flaminko folder: from_pretrained, and remote code without the package, give the greedy
    # tokens of the model at the end of training.
    model, processor = FlaminkoForConditionalGeneration.from_pretrained(final).eval(), AutoProcessor.from_pretrained(final)
    batch = processor(text=GREEDY_PROMPT, images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist() == whole["greedy_tokens"]
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_GREEDY)
    environment = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(script), str(final), GREEDY_PROMPT, str(NEW_TOKENS)], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(whole["greedy_tokens"])

    # SIGKILL at the end of step 3, after checkpoint-2; resumed from it, the run ends with the weights of
    # the run not killed.
    killed = tmp_path / "killed"
    job = run(killed, caption_table, source, config=config, per_device_batch=4, steps=4, save_steps=2, kill_at=3)
    assert job.returncode != 0
    assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2"] and not (killed / "final").exists()
    assert (killed / "checkpoint-2" / "global_step2").is_dir()
    resumed = run(
        killed, caption_table, source, "--resume_from_checkpoint", str(killed / "checkpoint-2"), config=config, per_device_batch=4,
        steps=4, save_steps=2, record=tmp_path / "resumed.pt",
    )
    assert resumed["state"].keys() == whole["state"].keys()
    for name, tensor in whole["state"].items():
        assert torch.equal(resumed["state"][name], tensor), name
