"""The command lines of the README and its docs/ pages, run as written through the `flaminko` console
script and torchrun, with the Hub names swapped for tiny local backbones and the budgets cut to a few steps."""

import json
import os
import socket
import subprocess
import sys

import yaml

from test_training import caption_table  # noqa: F401  (fixture)

# The console script resolves the package the way a user's shell does; PYTHONPATH (when set) selects this checkout.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def flaminko(*arguments, cwd):
    command = ["flaminko", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_flaminko_train_command(backbones, caption_table, tmp_path):  # noqa: F811
    # README (and docs/training.md): flaminko train --vision_model ... --language_model ... --train_data captions.tsv --eval_fraction 0.05
    #   --output_dir runs/ko --max_steps 2000 --per_device_train_batch_size 32 --learning_rate 1e-4 --bf16 --activation_checkpointing
    result = flaminko(
        "train", "--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"],
        "--train_data", caption_table, "--eval_fraction", "0.25", "--output_dir", tmp_path / "runs" / "ko",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-4", "--bf16",
        "--activation_checkpointing", "--use_cpu", "--report_to", "none", cwd=tmp_path,
    )
    final = tmp_path / "runs" / "ko" / "final"
    assert f"saved to {final}" in result.stdout
    assert (final / "model.safetensors").exists() and (final / "processor_config.json").exists()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_line_with_the_example_yaml(backbones, caption_table, tmp_path):  # noqa: F811
    # docs/training.md: torchrun --nproc_per_node 8 -m flaminko.cli train examples/train_openflaminko.yaml
    with open("examples/train_openflaminko.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config.update(
        vision_model=str(backbones["vision"]), language_model=str(backbones["gpt_neox"]), train_data=str(caption_table),
        data_format="captions", hangul_only=False, output_dir=str(tmp_path / "runs"), max_steps=2,
        per_device_train_batch_size=4, warmup_steps=0, dataloader_num_workers=0, bf16=False, use_cpu=True,
        ddp_backend="gloo",
    )
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "flaminko.cli", "train", str(tmp_path / "train.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=os.getcwd(), env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("saved to") == 1  # the main process saves, once
    assert (tmp_path / "runs" / "final" / "model.safetensors").exists()


def test_flaminko_demo_command(tmp_path):
    # README: flaminko demo (1500 steps; here 4, so only the command and its outputs are checked)
    flaminko("demo", "--out", tmp_path / "demo", "--steps", "4", cwd=tmp_path)
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["steps"] == 4
    assert (tmp_path / "demo" / "contact_sheet.png").exists()


def test_convert_flamingo_mini_command(backbones, tmp_path):
    # docs/conversion.md: flaminko convert flamingo-mini --checkpoint path/to/flamingo-mini --out flamingo-mini-hf
    from test_conversion_flamingo_mini import flamingo_mini_folder

    flamingo_mini_folder(tmp_path / "flamingo-mini", backbones, "gpt2", 2)
    result = flaminko("convert", "flamingo-mini", "--checkpoint", tmp_path / "flamingo-mini", "--out", tmp_path / "flamingo-mini-hf", cwd=tmp_path)
    assert "tensors mapped:" in result.stdout
    assert (tmp_path / "flamingo-mini-hf" / "model.safetensors").exists()
