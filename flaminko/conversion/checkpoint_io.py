"""Reading foreign checkpoints safely and writing converted Flaminko folders."""

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint_mapping_flaminko import strip_wrapper_prefixes

# Keys under which training loops nest the model's weights.
NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors, .pt or .bin file or a training checkpoint.

    Pickles load with weights_only=True: a file holding anything but tensors and plain
    containers is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        try:
            # Zip-format files (torch >= 1.6) are memory-mapped, so large ones are not read twice.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:
            raise ValueError(f"Refusing to load {str(path)!r}: it is not a plain tensor checkpoint ({error})") from error
    for key in NESTED_STATE_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} holds no flat state dict of tensors")
    return {strip_wrapper_prefixes(name): tensor for name, tensor in state.items()}


@dataclass
class ConversionSummary:
    tensors_mapped: int = 0
    parameters: int = 0
    dtype: str = ""
    bytes_written: int = 0
    initialised: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    config_changes: list[str] = field(default_factory=list)  # values a target config could not take as they were
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        lines = [
            f"tensors mapped:   {self.tensors_mapped}",
            f"parameters:       {self.parameters:,}",
            f"dtype:            {self.dtype}",
            f"bytes written:    {self.bytes_written:,}",
        ]
        lines += [f"initialised:      {note}" for note in self.initialised]
        lines += [f"left out:         {note}, recomputed by transformers 5 (checked equal)" for note in self.left_out]
        lines += [f"config:           {note}" for note in self.config_changes]
        if self.max_abs_diff is not None:
            lines.append(f"max |logits diff| vs reference: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


# Shards small enough that writing one (safetensors serialises a shard at a time) adds little to the peak.
MAX_SHARD_SIZE = "2GB"


def write_converted_folder(
    model, processor, out, *, base_models: list[str], origin: str, summary: ConversionSummary, license: str | None = None
):
    """Safetensors weights, config, processor, remote code and a model card; fills in the summary."""
    from ..hub_card import build_model_card, parameter_counts

    model.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    processor.save_pretrained(out)
    total, trained = parameter_counts(model)
    card = build_model_card(
        model.config,
        total_parameters=total,
        trained_parameters=trained,
        base_models=base_models,
        origin=f"Converted from a {origin} checkpoint with `flaminko convert`.",
        license=license,
    )
    card.save(Path(out) / "README.md")
    summary.parameters = sum(p.numel() for p in model.parameters())
    summary.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    summary.bytes_written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
