"""OpenFlamingo-format checkpoints (OpenFlamingo 3B/4B/9B, OpenFlaminKO, OmniCorpus runs) -> Flaminko.

OpenFlamingo saves only what it trains, plus every parameter with "embed" in its name: the
resampler, the gated cross-attention blocks and the LM's (input, and for GPT-NeoX output)
embeddings. The vision tower and the frozen LM come from the backbones the user names.
"""

import os
import tempfile
from pathlib import Path

from transformers import AutoConfig
from transformers.activations import ACT2FN

from ..modeling_flaminko import FlaminkoForConditionalGeneration, place_open_flamingo_checkpoint
from .checkpoint_io import ConversionSummary, load_state_dict, write_converted_folder
from .open_clip import save_open_clip_visual_as_hf, vision_convention


def place_checkpoint(model, checkpoint, *, original_vocab_size: int, init_missing_token_rows: bool = False):
    """place_open_flamingo_checkpoint (the model's own, so that it also works as remote code), summarised."""
    mapped, notes = place_open_flamingo_checkpoint(
        model, checkpoint, original_vocab_size=original_vocab_size, init_missing_token_rows=init_missing_token_rows
    )
    return ConversionSummary(tensors_mapped=mapped, initialised=notes)


def set_vision_activation(model, act: str):
    """The vision tower's MLP activation (open_clip >= 2.29 builds ViT-L-14 with GELU, whatever its weights)."""
    model.config.vision_config.hidden_act = act
    for layer in getattr(model.vision_model, "vision_model", model.vision_model).encoder.layers:
        layer.mlp.activation_fn = ACT2FN[act]


def convert_open_flamingo(
    checkpoint_path,
    vision,
    language_model,
    out,
    *,
    cross_attn_every_n_layers: int = 1,
    tokenizer=None,
    init_missing_token_rows: bool = False,
    convention: str = "openflamingo",
    verify: bool = False,
) -> ConversionSummary:
    """Convert an OpenFlamingo checkpoint to a Flaminko folder at `out` (safetensors, config,
    processor, remote code, model card). `vision`: a CLIP Hub id or folder, or an open_clip visual
    state dict file; `language_model`: a Hub id or folder. `convention`: how the checkpoint's
    training read the vision tower's patch tokens (see VISION_CONVENTIONS); with `verify`, the
    reference reads them the same way, through open_clip's own tower when `vision` is its file."""
    post_layernorm, act = vision_convention(convention)
    with tempfile.TemporaryDirectory() as scratch:
        open_clip_visual = vision if os.path.isfile(vision) else None
        if open_clip_visual is not None:
            vision = save_open_clip_visual_as_hf(open_clip_visual, Path(scratch) / "vision", hidden_act=act or "quick_gelu")
        checkpoint = load_state_dict(checkpoint_path)
        original_vocab_size = AutoConfig.from_pretrained(language_model).vocab_size
        model, processor = FlaminkoForConditionalGeneration.from_backbones(
            vision,
            language_model,
            tokenizer_name_or_path=tokenizer,
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            vision_feature_post_layernorm=post_layernorm,
        )
        if act is not None:
            set_vision_activation(model, act)
        summary = place_checkpoint(
            model, checkpoint, original_vocab_size=original_vocab_size, init_missing_token_rows=init_missing_token_rows
        )
        base_models = [str(open_clip_visual or vision), str(language_model)]
        write_converted_folder(model, processor, out, base_models=base_models, origin="OpenFlamingo", summary=summary)
        if verify:
            from .reference import compare_with_open_flamingo

            del model
            summary.max_abs_diff = compare_with_open_flamingo(
                out,
                checkpoint,
                vision,
                language_model,
                cross_attn_every_n_layers,
                tokenizer=tokenizer,
                initialised_from_row=original_vocab_size if summary.initialised else None,
                convention=convention,
                open_clip_visual=open_clip_visual,
            )
    return summary
