"""FSDP2 training of a tiny Flaminko with the settings of examples/accelerate_fsdp.yaml, on CPU.

accelerate 1.15 enables FSDP only on accelerator devices (a CPU launch with that config trains DDP),
so this script applies the config itself with torch's `fully_shard` and runs under torchrun with
gloo. test_sharded.py runs it and compares it with `reference_run`, the same steps in one process.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py VISION LM TABLE CHECKPOINT first|resume OUT
    torchrun --nproc_per_node 2 tests/fsdp_worker.py VISION LM TABLE - five|five-lora OUT

`first` and `resume` run 2 steps, save a sharded checkpoint, and resume from it for 2 more; `five`
(`five-lora`: with flaminko train's LoRA, without dropout) runs 5 steps and records each step's loss.
"""

import json
import sys
from pathlib import Path

import torch
import yaml

from conftest import build_model
from flaminko.data import CaptionTable, FlaminkoCollator
from flaminko.training import lora_config

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate_fsdp.yaml"
STEPS, FIRST_STEPS, COMPARED_STEPS, PER_RANK_BATCH, WORLD_SIZE = 4, 2, 5, 4, 2
LEARNING_RATE, MAX_GRAD_NORM = 1e-3, 1.0


def fsdp_settings(path=FSDP_CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))["fsdp_config"]


def build(vision, language, lora=False):
    """The same start on every rank and in the reference: seeded, gates open so the blocks learn from step 1.
    Trainable: resampler, gated blocks, the embedding (its pretrained rows held by a gradient hook);
    frozen: the vision tower and the rest of the LM. With lora: flaminko train's LoRA (no dropout, whose
    masks would differ between the ranks and one process)."""
    model, processor = build_model({"vision": vision, "lm": language}, family="lm")
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, dropout=0.0))
    return model.train(), FlaminkoCollator(processor)


def micro_batches(table, collator, step: int):
    """The step's global batch as the ranks see it: rank r takes the r-th slice."""
    samples = CaptionTable(table).samples
    start = step * PER_RANK_BATCH * WORLD_SIZE
    return [
        collator(samples[start + rank * PER_RANK_BATCH : start + (rank + 1) * PER_RANK_BATCH])
        for rank in range(WORLD_SIZE)
    ]


def optimizer_for(model):
    # No weight decay: it would shrink the frozen rows of the trainable embedding too.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)


def reference_run(vision, language, table, steps=STEPS, lora=False) -> tuple[dict, list[float]]:
    """The same steps in one process: each step averages the ranks' losses, as FSDP averages their
    gradients. Returns the trainable weights and each step's loss.

    It runs on one thread, as torchrun's workers do: a matrix product's sums are split by thread count,
    and Adam passes a rounding difference in a near-zero gradient on at up to the learning rate (on
    2 threads, one weight of 32768 moved 3.3e-6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, collator = build(vision, language, lora)
        optimizer = optimizer_for(model)
        losses = []
        for step in range(steps):
            optimizer.zero_grad()
            loss = sum(model(**batch).loss / WORLD_SIZE for batch in micro_batches(table, collator, step))
            loss.backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}, losses


def shard(model, settings: dict, mesh):
    """fully_shard on every module of the config's wrap classes, then on the whole model (FSDP2
    keeps each parameter apart, frozen or not: the config's use_orig_params)."""
    from torch.distributed.fsdp import fully_shard

    if settings["fsdp_version"] != 2 or settings["fsdp_auto_wrap_policy"] != "TRANSFORMER_BASED_WRAP":
        raise ValueError(f"{FSDP_CONFIG.name}: this run follows FSDP2 with TRANSFORMER_BASED_WRAP, got {settings}")
    classes = set(settings["fsdp_transformer_layer_cls_to_wrap"].split(","))
    reshard = settings["fsdp_reshard_after_forward"]
    wrapped = set()
    for module in list(model.modules()):
        name = type(module).__name__
        if name in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
            wrapped.add(name)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return wrapped


def main(vision, language, table, checkpoint, phase, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    assert dist.get_world_size() == WORLD_SIZE
    settings = fsdp_settings()
    model, collator = build(vision, language, lora=phase == "five-lora")
    wrapped = shard(model, settings, init_device_mesh("cpu", (WORLD_SIZE,)))
    optimizer = optimizer_for(model)
    first, losses = 0, []
    if phase == "resume":
        # SHARDED_STATE_DICT: each rank reads back its own shards of the model and the optimizer.
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        first = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    last = {"first": FIRST_STEPS, "resume": STEPS}.get(phase, COMPARED_STEPS)
    for step in range(first, last):
        optimizer.zero_grad()
        loss = model(**micro_batches(table, collator, step)[rank]).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / WORLD_SIZE)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        optimizer.step()
    if phase == "first":
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
        if rank == 0:
            (Path(checkpoint) / "trainer_state.json").write_text(json.dumps({"global_step": last}))
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            torch.save({name: full[name] for name in trainable}, out / f"{phase}-trainable.pt")
            torch.save({name: tensor for name, tensor in full.items() if name not in trainable}, out / f"{phase}-frozen.pt")
            (out / f"{phase}-losses.json").write_text(json.dumps(losses))
    sharded = {
        name: (tuple(p.to_local().shape), tuple(p.shape))
        for name, p in model.named_parameters()
        if isinstance(p, DTensor)
    }
    report = {"wrapped": sorted(wrapped), "parameters": len(list(model.parameters())), "sharded": sharded}
    (out / f"{phase}-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
