"""Sharded training: FSDP2 run for real on 2 CPU processes (gloo) with the example config's settings,
checkpointed, resumed and equal to one process; a CPU launch with an FSDP config refused; the
DeepSpeed configs accepted by accelerate; a model built from backbones under ZeRO-3 equal to one
process's."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flaminko import FlaminkoForConditionalGeneration
from fsdp_worker import COMPARED_STEPS, FSDP_CONFIG, build, fsdp_settings, reference_run
from test_distributed import free_port
from test_training import caption_table  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORKER = Path(__file__).with_name("fsdp_worker.py")


def torchrun(*arguments, out):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(WORKER), *map(str, arguments), str(out),
    ]
    # The workers import conftest and fsdp_worker from tests/ (the script's folder) and flaminko from PYTHONPATH.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_fsdp2_on_two_cpu_processes_resumes_and_matches_one_process(backbones, caption_table, tmp_path):  # noqa: F811
    vision, language, checkpoint = backbones["vision"], backbones["gpt_neox"], tmp_path / "checkpoint"
    torchrun(vision, language, caption_table, checkpoint, "first", out=tmp_path)
    # SHARDED_STATE_DICT: one file of shards per rank, no full copy.
    assert sorted(path.name for path in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    torchrun(vision, language, caption_table, checkpoint, "resume", out=tmp_path)

    for rank in (0, 1):
        report = json.loads((tmp_path / f"resume-rank{rank}.json").read_text())
        # Every class the config names exists in the model and was sharded on its own.
        assert report["wrapped"] == sorted(fsdp_settings()["fsdp_transformer_layer_cls_to_wrap"].split(","))
        assert len(report["sharded"]) == report["parameters"]
        local, full = report["sharded"]["perceiver.latents"]
        assert local[0] * 2 == full[0], (local, full)

    model = build(vision, language)[0]
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected, _ = reference_run(vision, language, caption_table)
    trained = torch.load(tmp_path / "resume-trainable.pt")
    frozen = torch.load(tmp_path / "resume-frozen.pt")
    assert trained.keys() == expected.keys()
    assert any("cross_attn_layers" in name for name in trained) and any("vision_model" in name for name in frozen)
    for name in expected:
        assert not torch.equal(trained[name], start[name]), f"{name} did not train"
        torch.testing.assert_close(trained[name], expected[name], rtol=0, atol=1e-5, msg=lambda detail, name=name: f"{name}: {detail}")
    for name, tensor in frozen.items():
        if name in start:
            assert torch.equal(tensor, start[name]), f"frozen {name} changed"
    # The embedding trains only the rows of the new tokens, also when sharded.
    embedding = "language_model.gpt_neox.embed_in.weight"
    changed_rows = (trained[embedding] != start[embedding]).any(1).nonzero().flatten().tolist()
    assert changed_rows == sorted([model.config.media_token_id, model.config.eoc_token_id])


def flaminko_train_error(backbones, table, out, *options, **environment):
    """The one error line of `flaminko train` (exit 2, no traceback), run as a user runs it."""
    command = [
        sys.executable, "-m", "flaminko.cli", "train", "--vision_model", str(backbones["vision"]),
        "--language_model", str(backbones["gpt_neox"]), "--train_data", str(table), "--output_dir", str(out),
        "--report_to", "none", *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **environment})
    assert result.returncode == 2, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("flaminko train: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()
    return errors[0]


def test_train_refuses_an_fsdp_launch_on_cpu(backbones, caption_table, tmp_path):  # noqa: F811
    """accelerate launch with an FSDP config exports ACCELERATE_USE_FSDP; on the CPU accelerate would
    train DDP instead, silently."""
    error = flaminko_train_error(backbones, caption_table, tmp_path / "out", "--use_cpu", ACCELERATE_USE_FSDP="true")
    assert error.startswith("flaminko train: error: FSDP") and "train DDP instead" in error


def test_train_refuses_deepspeed_on_a_cpu_machine_without_use_cpu(backbones, caption_table, tmp_path):  # noqa: F811
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'flaminko[deepspeed]'")
    if torch.accelerator.is_available():
        pytest.skip("DeepSpeed runs on the accelerator here")
    error = flaminko_train_error(backbones, caption_table, tmp_path / "out", ACCELERATE_USE_DEEPSPEED="true")
    assert error.startswith("flaminko train: error: DeepSpeed") and "--use_cpu" in error


def test_deepspeed_zero2_trains_on_two_cpu_processes(backbones, caption_table, tmp_path):  # noqa: F811
    """accelerate launch with the ZeRO-2 example config, through `flaminko train`, as a user runs it:
    each rank keeps its own shard of the optimizer states."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'flaminko[deepspeed]'")
    if torch.accelerator.is_available():
        pytest.skip("the CPU path (--use_cpu); on GPUs accelerate runs the same config without it")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate_deepspeed_zero2.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "flaminko.cli", "train", "--vision_model", str(backbones["vision"]), "--language_model", str(backbones["gpt_neox"]),
        "--train_data", str(caption_table), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--save_steps", "2", "--report_to", "none", "--use_cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    shards = sorted(path.name for path in (out / "checkpoint-2" / "global_step2").glob("*optim_states.pt"))
    assert len(shards) == 2 and all("zero_pp_rank_" in name for name in shards), shards
    start, final = load_file(out / "base-model" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert not torch.equal(start["perceiver.latents"], final["perceiver.latents"])
    assert all(torch.equal(start[name], final[name]) for name in start if name.startswith("vision_model."))


def accelerate_environment(config_file, launcher):
    """The environment `accelerate launch --config_file CONFIG` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    # As launch_command does before it starts DeepSpeed.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    environment = launcher(args)
    return environment[1] if isinstance(environment, tuple) else environment


def test_the_fsdp_config_is_what_accelerate_builds(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    environment = accelerate_environment(FSDP_CONFIG, prepare_multi_gpu_env)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    settings = fsdp_settings()
    assert environment["ACCELERATE_USE_FSDP"] == "true" and plugin.fsdp_version == settings["fsdp_version"] == 2
    assert plugin.transformer_cls_names_to_wrap == settings["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert plugin.state_dict_type.name == settings["fsdp_state_dict_type"]
    assert plugin.reshard_after_forward is settings["fsdp_reshard_after_forward"]


@pytest.mark.parametrize("stage", [2, 3])
def test_the_deepspeed_configs_are_what_accelerate_builds(stage, monkeypatch):
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'flaminko[deepspeed]'")
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config_file = EXAMPLES / f"accelerate_deepspeed_zero{stage}.yaml"
    written = yaml.safe_load(config_file.read_text(encoding="utf-8"))["deepspeed_config"]
    environment = accelerate_environment(config_file, prepare_deepspeed_cmd_env)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert config["zero_optimization"]["stage"] == written["zero_stage"] == stage
    assert config["gradient_clipping"] == written["gradient_clipping"]
    assert plugin.zero3_init_flag is written["zero3_init_flag"]
    # DeepSpeed's own parser reads the config once the batch sizes are filled in (the Trainer fills them).
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = json.loads(json.dumps(config).replace('"auto"', "1"))
    filled.update(train_batch_size=8, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1)
    assert DeepSpeedConfig(filled).zero_optimization_stage == stage


ZERO3_IN_ONE_PROCESS = textwrap.dedent(
    """
    import os, sys
    import deepspeed, torch
    from safetensors.torch import save_file
    from transformers.integrations import HfDeepSpeedConfig
    from flaminko import FlaminkoForConditionalGeneration

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed("gloo")
    # Held in a variable: transformers keeps only a weak reference to it.
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    torch.manual_seed(0)
    model, _ = FlaminkoForConditionalGeneration.from_backbones(sys.argv[1], sys.argv[2])
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        save_file({name: p.detach().clone() for name, p in model.named_parameters()}, sys.argv[4])
    """
)


def test_from_backbones_under_zero3_builds_what_one_process_builds(backbones, tmp_path):
    """Under ZeRO-3 the loaded backbones are partitioned as they load (each process holds slices, and a
    weight's shape reads (0,)); the model built from them, new token rows included, is one process's."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'flaminko[deepspeed]'")
    script, weights = tmp_path / "zero3.py", tmp_path / "zero3.safetensors"
    script.write_text(ZERO3_IN_ONE_PROCESS)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(script), str(backbones["vision"]), str(backbones["gpt_neox"]), str(free_port()), str(weights)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    built = load_file(weights)
    torch.manual_seed(0)
    expected = dict(FlaminkoForConditionalGeneration.from_backbones(backbones["vision"], backbones["gpt_neox"])[0].named_parameters())
    assert built.keys() == expected.keys()
    for name, tensor in built.items():
        assert torch.equal(tensor, expected[name].detach()), name


@pytest.mark.parametrize(
    "options, named",
    [
        (["--use_lora", "--merge"], "--merge under DeepSpeed ZeRO-3"),
        (["--use_lora"], "--use_lora under DeepSpeed ZeRO-3 on the CPU"),
    ],
)
def test_train_refuses_what_zero3_cannot_do(options, named, backbones, caption_table, tmp_path):  # noqa: F811
    """Before anything is built: a merge needs whole weights, and peft gathers trainable token rows onto CUDA."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'flaminko[deepspeed]'")
    if torch.accelerator.is_available() and "--merge" not in options:
        pytest.skip("on GPUs peft gathers the token rows where they are")
    environment = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    error = flaminko_train_error(backbones, caption_table, tmp_path / "out", "--use_cpu", *options, **environment)
    assert error.startswith(f"flaminko train: error: {named}"), error


@pytest.mark.parametrize("phase", ["five", "five-lora"])
def test_fsdp2_first_five_steps_equal_one_process(phase, backbones, caption_table, tmp_path):  # noqa: F811
    """The example config's FSDP2 on 2 CPU processes, with and without flaminko train's LoRA: each step's
    loss (the mean over the ranks) within 1e-4 of one process's, the trainable weights after 5 steps within
    1e-6 (the gradients are reduce-scattered over the ranks, summed in another order than in one process;
    see test_equal_to_one_process.py), the frozen ones bit for bit."""
    lora = phase == "five-lora"
    vision, language = backbones["vision"], backbones["gpt_neox"]
    torchrun(vision, language, caption_table, "-", phase, out=tmp_path)
    expected, expected_losses = reference_run(vision, language, caption_table, steps=COMPARED_STEPS, lora=lora)
    losses = json.loads((tmp_path / f"{phase}-losses.json").read_text())
    assert len(losses) == COMPARED_STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=0, atol=1e-4)
    trained, frozen = torch.load(tmp_path / f"{phase}-trainable.pt"), torch.load(tmp_path / f"{phase}-frozen.pt")
    assert trained.keys() == expected.keys()
    assert any("lora_B" in name for name in trained) is lora
    start = {name: p.detach().clone() for name, p in build(vision, language, lora)[0].named_parameters()}
    for name in expected:
        assert not torch.equal(trained[name], start[name]), f"{name} did not train"
        torch.testing.assert_close(trained[name], expected[name], rtol=0, atol=1e-6, msg=lambda detail, name=name: f"{name}: {detail}")
    assert any("vision_model" in name for name in frozen)
    for name, tensor in frozen.items():
        if name in start:
            assert torch.equal(tensor, start[name]), f"frozen {name} changed"
