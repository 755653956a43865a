"""Two processes on CPU (gloo DDP through torchrun and the Trainer): both ranks end with identical weights."""

import json
import math
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from test_training import caption_table  # noqa: F401  (fixture)

WORKER = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import TrainingArguments
    from flaminko.training import DataArguments, ModelArguments, train

    vision, language, table, out = sys.argv[1:5]
    trainer, _ = train(
        ModelArguments(vision_model=vision, language_model=language),
        DataArguments(train_data=table),
        TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                          save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", seed=0),
    )
    assert dist.is_initialized() and dist.get_world_size() == 2
    weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(weights, f"{out}/rank{dist.get_rank()}.safetensors")
    """
)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_keeps_ranks_identical(backbones, caption_table, tmp_path):  # noqa: F811
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(script),
        str(backbones["vision"]), str(backbones["gpt_neox"]), str(caption_table), str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = load_file(tmp_path / "out" / "rank0.safetensors"), load_file(tmp_path / "out" / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    start = load_file(tmp_path / "out" / "base-model" / "model.safetensors")
    assert any(not torch.equal(rank0[name], start[name]) for name in rank0 if name in start)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.skipif(torch.accelerator.is_available(), reason="with a GPU the same command trains DDP on the GPUs")
def test_torchrun_as_the_training_page_writes_it_trains_one_ddp_run_on_cpu(backbones, caption_table, tmp_path):  # noqa: F811
    """`torchrun --nproc_per_node 2 -m flaminko.cli train ...` without --use_cpu on a machine without a
    GPU: one DDP run over gloo (each step takes both ranks' batches), not two copies writing one folder."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "flaminko.cli", "train",
        "--vision_model", str(backbones["vision"]), "--language_model", str(backbones["gpt_neox"]),
        "--train_data", str(caption_table), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--save_steps", "2", "--report_to", "none",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    assert result.stdout.count("saved to") == 1
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    rows = len(caption_table.read_text().splitlines()) - 1
    assert state["epoch"] == pytest.approx(2 / math.ceil(rows / (2 * 4)))  # two ranks' batches of 4 per step
