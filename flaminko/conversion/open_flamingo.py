"""OpenFlamingo-format checkpoints (OpenFlamingo 3B/4B/9B, OpenFlaminKO, OmniCorpus runs) -> Flaminko.

OpenFlamingo saves only what it trains, plus every parameter with "embed" in its name and every
persistent buffer: the resampler, the gated cross-attention blocks, the LM's (input, and for
GPT-NeoX output) embeddings and, under transformers 4.x, buffers transformers 5 recomputes. The
vision tower and the frozen LM come from the backbones the user names.
"""

import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.activations import ACT2FN

from ..checkpoint_mapping_flaminko import drop_recomputed_buffers, place_open_flamingo_checkpoint
from ..modeling_flaminko import FlaminkoForConditionalGeneration
from .checkpoint_io import ConversionSummary, load_state_dict, write_converted_folder
from .mosaic_gpt import check_mpt_config, download_without_code, is_mosaic_gpt, model_config_dict, write_mosaic_gpt_as_mpt
from .open_clip import save_open_clip_visual_as_hf, vision_convention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
def place_checkpoint(model, checkpoint, *, original_vocab_size: int, init_missing_token_rows: bool = False):
    """place_open_flamingo_checkpoint (shipped with the model, so that its load_state_dict takes the checkpoint
    as remote code too), summarised."""
    mapped, notes = place_open_flamingo_checkpoint(
        model, checkpoint, original_vocab_size=original_vocab_size, init_missing_token_rows=init_missing_token_rows
    )
    return ConversionSummary(tensors_mapped=mapped, initialised=notes)


def check_token_rows(model, tokenizer, *, pad_token_added: bool | None = None):
    """The tokenizer must have one token per embedding row of the checkpoint, and `<|endofchunk|>`,
    `<image>` and `<PAD>` the ids OpenFlamingo's factory gave them: appended in that order after the
    LM's own tokens, `<PAD>` when the LM's tokenizer had no pad token (pad_token_added: whether it
    did for this release; None: as this tokenizer says)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens with OpenFlamingo's added ones, but the checkpoint's embedding "
            f"has {rows} rows: pass the tokenizer the model was trained with (--tokenizer)"
        )
    if pad_token_added is None:
        pad_token_added = tokenizer.pad_token == "<PAD>"
    added = ["<|endofchunk|>", "<image>"] + (["<PAD>"] if pad_token_added else [])
    vocabulary = tokenizer.get_vocab()
    for expected, token in enumerate(added, start=rows - len(added)):
        if vocabulary.get(token) != expected:
            raise ValueError(
                f"{token} has id {vocabulary.get(token)} but OpenFlamingo gave it {expected} ({', '.join(added)} after the "
                "LM's own tokens): pass the tokenizer the model was trained with (--tokenizer)"
            )


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
    dtype: str = "float32",
    base_models: list[str] | None = None,
    license: str | None = None,
    origin: str = "OpenFlamingo",
    pad_token_added: bool | None = None,
    verify: bool = False,
) -> ConversionSummary:
    """Convert an OpenFlamingo checkpoint to a Flaminko folder at `out` (safetensors, config,
    processor, remote code, model card). `vision`: a CLIP Hub id or folder, or an open_clip visual
    state dict file; `language_model`: a Hub id or folder (a MosaicGPT folder is read without
    running its code). `convention`: how the checkpoint's training read the vision tower's patch
    tokens (see VISION_CONVENTIONS); `dtype`: the weights' dtype in the folder; `base_models`
    (Hub ids, also recorded as the config's backbones), `license` and `origin` (the release) go to
    the model card; `pad_token_added`: whether OpenFlamingo added `<PAD>` (None: when the tokenizer
    has no pad token of its own). With `verify`, OpenFlamingo's own model is built
    around the same backbones and compared."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if verify and dtype != "float32":
        raise ValueError("--verify compares float32 logits: convert with --dtype float32 to verify")
    post_layernorm, act = vision_convention(convention)
    with tempfile.TemporaryDirectory() as scratch:
        open_clip_visual = vision if os.path.isfile(vision) else None
        if open_clip_visual is not None:
            vision = save_open_clip_visual_as_hf(open_clip_visual, Path(scratch) / "vision", hidden_act=act or "quick_gelu")
        lm_folder, query_key_norms, config_changes = language_model, {}, []
        if is_mosaic_gpt(model_config_dict(language_model)):
            local = language_model if os.path.isdir(language_model) else download_without_code(language_model)
            lm_folder, query_key_norms, config_changes = write_mosaic_gpt_as_mpt(local, Path(scratch) / "lm", DTYPES[dtype])
        text_config = AutoConfig.from_pretrained(lm_folder)
        if text_config.model_type == "mpt":
            check_mpt_config(text_config)
        # The LM's QK LayerNorm weights (MosaicGPT's) are placed with the checkpoint, under the LM's names.
        checkpoint = {
            **load_state_dict(checkpoint_path),
            **{f"lang_encoder.{name}": tensor for name, tensor in query_key_norms.items()},
        }
        tokenizer_source = tokenizer or lm_folder
        model, processor = FlaminkoForConditionalGeneration.from_backbones(
            vision,
            lm_folder,
            tokenizer_name_or_path=tokenizer_source,
            dtype=DTYPES[dtype],
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            vision_feature_post_layernorm=post_layernorm,
        )
        if act is not None:
            set_vision_activation(model, act)
        checkpoint, left_out = drop_recomputed_buffers(checkpoint, model)
        summary = place_checkpoint(
            model, checkpoint, original_vocab_size=text_config.vocab_size, init_missing_token_rows=init_missing_token_rows
        )
        summary.left_out, summary.config_changes = left_out, config_changes
        check_token_rows(model, processor.tokenizer, pad_token_added=pad_token_added)
        base_models = base_models or [str(open_clip_visual or vision), str(language_model)]
        model.config.vision_config._name_or_path, model.config.text_config._name_or_path = base_models
        write_converted_folder(
            model, processor, out, base_models=base_models, license=license, origin=origin, summary=summary
        )
        if verify:
            from .reference import compare_with_open_flamingo

            del model
            summary.max_abs_diff = compare_with_open_flamingo(
                out,
                checkpoint,
                vision,
                language_model,
                cross_attn_every_n_layers,
                tokenizer=tokenizer_source,
                initialised_from_row=text_config.vocab_size if summary.initialised else None,
                convention=convention,
                open_clip_visual=open_clip_visual,
            )
    return summary
