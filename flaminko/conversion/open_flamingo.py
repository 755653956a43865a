"""OpenFlamingo-format checkpoints (OpenFlamingo 3B/4B/9B, OpenFlaminKO, OmniCorpus runs) -> Flaminko.

OpenFlamingo saves only what it trains, plus every parameter with "embed" in its name: the
resampler, the gated cross-attention blocks and the LM's (input, and for GPT-NeoX output)
embeddings. The vision tower and the frozen LM come from the backbones the user names.
"""

import re

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from ..modeling_flaminko import FlaminkoForConditionalGeneration, decoder_layers_path
from .checkpoint_io import ConversionSummary, load_state_dict, write_converted_folder
from .open_clip import open_clip_visual_to_hf

_PERCEIVER_FEED_FORWARD = {"0": "norm", "1": "up_proj", "3": "down_proj"}
_BLOCK_FEED_FORWARD = {"0": "norm", "1": "up_proj", "3": "down_proj"}
# transformers 4.x names (as in OpenFlamingo checkpoints) -> the in-memory names of transformers 5.
_TRANSFORMERS_4_NAMES = {"gpt_neox": {"embed_out.": "lm_head."}}


def _block_part(rest: str) -> str:
    feed_forward = re.fullmatch(r"ff\.(\d)\.(.+)", rest)
    if feed_forward:
        return f"ff.{_BLOCK_FEED_FORWARD[feed_forward.group(1)]}.{feed_forward.group(2)}"
    return rest


def flaminko_name(key: str, layers_path: str, lm_type: str) -> str | None:
    """The Flaminko parameter an OpenFlamingo key fills, or None when it has no place."""
    match = re.fullmatch(r"perceiver\.layers\.(\d+)\.0\.(.+)", key)
    if match:
        return f"perceiver.layers.{match.group(1)}.attention.{match.group(2)}"
    match = re.fullmatch(r"perceiver\.layers\.(\d+)\.1\.([013])\.(.+)", key)
    if match:
        index, part, rest = match.groups()
        return f"perceiver.layers.{index}.feed_forward.{_PERCEIVER_FEED_FORWARD[part]}.{rest}"
    if key in ("perceiver.latents", "perceiver.norm.weight", "perceiver.norm.bias"):
        return key
    if key == "perceiver.frame_embs":
        return "perceiver.frame_embeddings"
    match = re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", key) or re.fullmatch(
        r"lang_encoder\..+\.(\d+)\.gated_cross_attn_layer\.(.+)", key
    )
    if match:
        return f"cross_attn_layers.{match.group(1)}.{_block_part(match.group(2))}"
    match = re.fullmatch(r"lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)", key) or re.fullmatch(
        r"lang_encoder\..+\.(\d+)\.decoder_layer\.(.+)", key
    )
    if match:
        return f"language_model.{layers_path}.{match.group(1)}.{match.group(2)}"
    match = re.fullmatch(r"lang_encoder\.(.+)", key)
    if match:
        name = match.group(1)
        for old, new in _TRANSFORMERS_4_NAMES.get(lm_type, {}).items():
            if name.startswith(old):
                name = new + name[len(old) :]
        return f"language_model.{name}"
    return None


def _parameter_name(model, parameter) -> str:
    return next(name for name, p in model.named_parameters() if p is parameter)


def place_checkpoint(
    model: FlaminkoForConditionalGeneration,
    checkpoint: dict[str, torch.Tensor],
    *,
    original_vocab_size: int,
    init_missing_token_rows: bool = False,
) -> ConversionSummary:
    """Copy an OpenFlamingo state dict into `model` (built from the same backbones).

    Raises ValueError listing every checkpoint key without a place, every shape that does not
    fit and every weight left unfilled. The one exception allowed on request: embedding rows of
    the new tokens that the checkpoint never had (OpenFlamingo saves no LLaMA lm_head), which
    are then set to the mean of the original rows.
    """
    layers_path = decoder_layers_path(model.language_model)
    lm_type = model.config.text_config.model_type
    vision_keys = {k[len("vision_encoder.") :]: v for k, v in checkpoint.items() if k.startswith("vision_encoder.")}
    mapped, unplaced = {}, []
    if vision_keys:
        converted, unknown = open_clip_visual_to_hf(vision_keys)
        # (open_clip key names are not kept through the q/k/v split; the HF name is reported instead)
        mapped.update({f"vision_model.{name}": (f"vision_encoder -> {name}", t) for name, t in converted.items()})
        unplaced += [f"vision_encoder.{name}" for name in unknown]
    for key, tensor in checkpoint.items():
        if key.startswith("vision_encoder."):
            continue
        name = flaminko_name(key, layers_path, lm_type)
        if name is None:
            unplaced.append(key)
        elif name in mapped and not torch.equal(mapped[name][1], tensor):
            raise ValueError(f"Checkpoint keys {mapped[name][0]!r} and {key!r} fill {name!r} with different values")
        else:
            mapped[name] = (key, tensor)

    input_name = _parameter_name(model, model.get_input_embeddings().weight)
    if input_name in mapped and mapped[input_name][1].shape[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(mapped[input_name][1].shape[0], mean_resizing=False)
        model.apply_freezing()
    state = model.state_dict()
    unplaced += [mapped[name][0] for name in mapped if name not in state]
    misfits = [
        f"{key} {tuple(tensor.shape)} -> {name} {tuple(state[name].shape)}"
        for name, (key, tensor) in mapped.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if unplaced or misfits:
        raise ValueError(
            "The checkpoint does not fit this model.\n"
            + (f"Keys with no place ({len(unplaced)}): {sorted(unplaced)}\n" if unplaced else "")
            + (f"Shapes that do not fit ({len(misfits)}): {misfits}" if misfits else "")
        )

    unfilled = [name for name in state if name.startswith(("perceiver.", "cross_attn_layers.")) and name not in mapped]
    rows = model.get_input_embeddings().weight.shape[0]
    token_rows = {}
    output = model.get_output_embeddings()
    for parameter in (model.get_input_embeddings().weight, output.weight if output is not None else None):
        if parameter is None or rows <= original_vocab_size:
            continue
        name = _parameter_name(model, parameter)
        if name not in mapped:
            token_rows[name] = parameter
    if unfilled:
        raise ValueError(f"The checkpoint leaves these Flaminko weights unfilled: {unfilled}")
    if token_rows and not init_missing_token_rows:
        raise ValueError(
            f"The checkpoint has no rows for the new tokens (ids {original_vocab_size}..{rows - 1}) of "
            f"{sorted(token_rows)}. Pass --init-missing-token-rows to set them to the mean of the original rows."
        )

    summary = ConversionSummary()
    with torch.no_grad():
        for name, (_, tensor) in tqdm(mapped.items(), desc="mapping tensors", unit="tensor"):
            state[name].copy_(tensor)
            summary.tensors_mapped += 1
        for name, parameter in token_rows.items():
            parameter[original_vocab_size:] = parameter[:original_vocab_size].mean(0)
            summary.initialised.append(
                f"{name} rows {original_vocab_size}..{rows - 1} = mean of the original rows (not in the checkpoint)"
            )
    return summary


def convert_open_flamingo(
    checkpoint_path,
    vision,
    language_model,
    out,
    *,
    cross_attn_every_n_layers: int = 1,
    tokenizer=None,
    init_missing_token_rows: bool = False,
    verify: bool = False,
) -> ConversionSummary:
    """Convert an OpenFlamingo checkpoint to a Flaminko folder at `out` (safetensors, config,
    processor, remote code, model card). `vision` and `language_model`: Hub ids or folders."""
    checkpoint = load_state_dict(checkpoint_path)
    original_vocab_size = AutoConfig.from_pretrained(language_model).vocab_size
    model, processor = FlaminkoForConditionalGeneration.from_backbones(
        vision,
        language_model,
        tokenizer_name_or_path=tokenizer,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    summary = place_checkpoint(
        model, checkpoint, original_vocab_size=original_vocab_size, init_missing_token_rows=init_missing_token_rows
    )
    write_converted_folder(model, processor, out, base_models=[str(vision), str(language_model)], origin="OpenFlamingo", summary=summary)
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
        )
    return summary
