"""OpenFlamingo's checkpoint layout (open_clip's vision tower within it) -> Flaminko's parameter names,
and the placing of such a checkpoint into a Flaminko model.

Shipped beside the model as remote code, so that a model loaded with trust_remote_code takes an
OpenFlamingo checkpoint in load_state_dict (OpenFlaminKO's own loading line) without the flaminko
package; flaminko.conversion builds its converters on it. Imports only torch and transformers.

transformers' own checkpoint conversion (a key mapping applied by from_pretrained) does not carry
this: an OpenFlamingo checkpoint holds only the trained part of the model, goes over two pretrained
backbones and comes through load_state_dict, not from_pretrained; and open_clip's fused attention
input projection splits three ways, which a key mapping cannot say. What transformers knows of a
language model's older names (GPT-NeoX's embed_out is lm_head) is taken from its conversion mapping.
"""

import re
from collections import Counter

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings

# Wrappers that training code puts in front of parameter names (DDP, FSDP, activation checkpointing, torch.compile).
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_FEED_FORWARD_PARTS = {"0": "norm", "1": "up_proj", "3": "down_proj"}
_OPEN_CLIP_LAYER_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_TOP_LEVEL = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}


def decoder_layers_path(language_model: PreTrainedModel) -> str:
    """Dotted path of the ModuleList of decoder layers of any HF causal LM (gpt_neox.layers,
    model.layers, transformer.h, model.decoder.layers, transformer.blocks...): where the model hooks
    its gated blocks in, and the prefix under which checkpoints name the layers' weights."""
    num_layers = language_model.config.num_hidden_layers
    for name, module in language_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name
    raise ValueError(
        f"Could not find the {num_layers} decoder layers of {type(language_model).__name__}: "
        "Flaminko needs a ModuleList of num_hidden_layers decoder layers"
    )


def strip_wrapper_prefixes(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def open_clip_visual_to_hf(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip visual tower weights -> (CLIPVisionModel state dict with transformers 5 names, names
    with no place). The fused attention input projection is split into q, k and v; `proj` (to the
    joint text-image space) is dropped: Flamingo reads the tokens before it."""
    converted, unplaced = {}, []
    for name, tensor in state_dict.items():
        if name in _OPEN_CLIP_TOP_LEVEL:
            converted[_OPEN_CLIP_TOP_LEVEL[name]] = tensor
            continue
        if name == "proj":
            continue
        # nn.MultiheadAttention names its fused input projection in_proj_weight / in_proj_bias.
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)", name)
        if match is None:
            unplaced.append(name)
            continue
        index, part, kind = match.groups()
        prefix = f"encoder.layers.{index}"
        if part == "attn.in_proj":
            for projection, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}.self_attn.{projection}.{kind}"] = chunk
        elif part in _OPEN_CLIP_LAYER_PARTS:
            converted[f"{prefix}.{_OPEN_CLIP_LAYER_PARTS[part]}.{kind}"] = tensor
        else:
            unplaced.append(name)
    return converted, unplaced


def _block_part(rest: str) -> str:
    feed_forward = re.fullmatch(r"ff\.(\d)\.(.+)", rest)
    if feed_forward:
        return f"ff.{_FEED_FORWARD_PARTS[feed_forward.group(1)]}.{feed_forward.group(2)}"
    return rest


def language_model_renamings(language_model) -> list[WeightRenaming]:
    """The renames transformers' from_pretrained applies to a checkpoint of this LM: its names under
    transformers 4.x (as in OpenFlamingo checkpoints) -> those it keeps in memory."""
    return [transform for transform in get_model_conversion_mapping(language_model) if isinstance(transform, WeightRenaming)]


def open_flamingo_key_to_flaminko(key: str, layers_path: str, lm_renamings: list[WeightRenaming]) -> str | None:
    """The Flaminko parameter an OpenFlamingo key (vision keys aside) fills, or None when it has no place.
    layers_path: where the LM keeps its decoder layers; lm_renamings: language_model_renamings of the LM."""
    match = re.fullmatch(r"perceiver\.layers\.(\d+)\.0\.(.+)", key)
    if match:
        return f"perceiver.layers.{match.group(1)}.attention.{match.group(2)}"
    match = re.fullmatch(r"perceiver\.layers\.(\d+)\.1\.([013])\.(.+)", key)
    if match:
        index, part, rest = match.groups()
        return f"perceiver.layers.{index}.feed_forward.{_FEED_FORWARD_PARTS[part]}.{rest}"
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
        name = f"{layers_path}.{match.group(1)}.{match.group(2)}"
    elif key.startswith("lang_encoder."):
        name = key.removeprefix("lang_encoder.")
    else:
        return None
    return f"language_model.{apply_renamings(name, lm_renamings)}"


def is_open_flamingo_state_dict(state_dict) -> bool:
    return any(strip_wrapper_prefixes(key).startswith("lang_encoder.") for key in state_dict)


# Persistent buffers of transformers 4.x models that transformers 5 recomputes instead of loading:
# GPT-NeoX's causal mask and masked bias, rotary inverse frequencies (GPT-NeoX, LLaMA), CLIP's position ids.
RECOMPUTED_BUFFER = re.compile(r"(?:^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids)$")
GPT_NEOX_MASKED_BIAS = -1e9


def _recomputed_value(kind: str, model) -> torch.Tensor | None:
    """What transformers 5 computes for a buffer of this kind in `model` (None: nothing to compare with)."""
    if kind == "attention.bias":
        positions = model.config.text_config.max_position_embeddings
        return torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    if kind == "attention.masked_bias":
        return torch.tensor(GPT_NEOX_MASKED_BIAS)
    if kind == "rotary_emb.inv_freq":
        found = [buffer for name, buffer in model.language_model.named_buffers() if name.endswith("rotary_emb.inv_freq")]
        return found[0] if found else None
    vision = model.config.vision_config
    return torch.arange((vision.image_size // vision.patch_size) ** 2 + 1).expand(1, -1)


def _same(saved: torch.Tensor, expected: torch.Tensor) -> bool:
    if saved.shape != expected.shape:
        return False
    if saved.is_floating_point():
        # Within rounding of the coarser of the two (a model converted to bfloat16 holds its buffers so).
        tolerance = max(torch.finfo(saved.dtype).eps, torch.finfo(expected.dtype).eps) * 4
        return torch.allclose(saved.float(), expected.float(), rtol=tolerance, atol=0)
    return torch.equal(saved, expected.to(saved.dtype))


def drop_recomputed_buffers(checkpoint: dict, model) -> tuple[dict, list[str]]:
    """(checkpoint without the transformers 4.x buffers transformers 5 recomputes, a line per left-out
    key pattern with its count). Raises ValueError naming the buffers whose values differ from what
    the model computes: such a checkpoint was trained with something this model does not do."""
    kept, left_out, differing = {}, [], []
    for key, tensor in checkpoint.items():
        match = RECOMPUTED_BUFFER.search(key)
        if match is None:
            kept[key] = tensor
            continue
        expected = _recomputed_value(match.group(1), model)
        if expected is None or not _same(tensor, expected):
            differing.append(key)
        left_out.append(key)
    if differing:
        raise ValueError(
            f"These checkpoint buffers differ from what the model computes, so they cannot be left out ({len(differing)}): "
            f"{sorted(differing)}"
        )
    patterns = Counter(re.sub(r"\.\d+\.", ".*.", key) for key in left_out)
    return kept, [f"{pattern} ({count} key{'s' if count > 1 else ''})" for pattern, count in sorted(patterns.items())]


def place_open_flamingo_checkpoint(
    model, checkpoint: dict, *, original_vocab_size: int, init_missing_token_rows: bool = False
) -> tuple[int, list[str]]:
    """Copy an OpenFlamingo state dict into `model` (built from the same backbones); returns (tensors
    copied, notes on the rows set without the checkpoint).

    Raises ValueError listing every checkpoint key without a place, every shape that does not
    fit and every weight left unfilled. The one exception allowed on request: embedding rows of
    the new tokens that the checkpoint never had (OpenFlamingo saves no LLaMA lm_head), which
    are then set to the mean of the original rows.
    """
    checkpoint = {strip_wrapper_prefixes(key): tensor for key, tensor in checkpoint.items()}
    layers_path = decoder_layers_path(model.language_model)
    lm_renamings = language_model_renamings(model.language_model)
    names = {parameter: name for name, parameter in model.named_parameters()}
    vision_keys = {k[len("vision_encoder.") :]: v for k, v in checkpoint.items() if k.startswith("vision_encoder.")}
    mapped, unplaced = {}, []
    if vision_keys:
        converted, unknown = open_clip_visual_to_hf(vision_keys)
        mapped.update({f"vision_model.{name}": (f"vision_encoder -> {name}", t) for name, t in converted.items()})
        unplaced += [f"vision_encoder.{name}" for name in unknown]
    for key, tensor in checkpoint.items():
        if key.startswith("vision_encoder."):
            continue
        name = open_flamingo_key_to_flaminko(key, layers_path, lm_renamings)
        if name is None:
            unplaced.append(key)
        elif name in mapped and not torch.equal(mapped[name][1], tensor):
            raise ValueError(f"Checkpoint keys {mapped[name][0]!r} and {key!r} fill {name!r} with different values")
        else:
            mapped[name] = (key, tensor)

    input_name = names[model.get_input_embeddings().weight]
    if input_name in mapped and mapped[input_name][1].shape[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(mapped[input_name][1].shape[0], mean_resizing=False)
        model.apply_freezing()
        names = {parameter: name for name, parameter in model.named_parameters()}
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
    if unfilled:
        raise ValueError(f"The checkpoint leaves these Flaminko weights unfilled: {unfilled}")
    rows = model.get_input_embeddings().weight.shape[0]
    output = model.get_output_embeddings()
    token_rows = {
        names[parameter]: parameter
        for parameter in (model.get_input_embeddings().weight, output.weight if output is not None else None)
        if parameter is not None and rows > original_vocab_size and names[parameter] not in mapped
    }
    if token_rows and not init_missing_token_rows:
        raise ValueError(
            f"The checkpoint has no rows for the new tokens (ids {original_vocab_size}..{rows - 1}) of "
            f"{sorted(token_rows)}. Pass --init-missing-token-rows to set them to the mean of the original rows."
        )
    notes = []
    with torch.no_grad():
        for name, (_, tensor) in mapped.items():
            state[name].copy_(tensor)
        for name, parameter in token_rows.items():
            parameter[original_vocab_size:] = parameter[:original_vocab_size].mean(0)
            notes.append(
                f"{name} rows {original_vocab_size}..{rows - 1} = mean of the original rows (not in the checkpoint)"
            )
    return len(mapped), notes


def load_open_flamingo_state_dict(model, state_dict: dict):
    """The model's load_state_dict for an OpenFlamingo state dict: the transformers 4.x buffers are checked
    and left out, the rest placed key by key, and embedding rows of the new tokens that the checkpoint
    lacks set to the mean of the original rows."""
    state_dict, _ = drop_recomputed_buffers(state_dict, model)
    # New tokens were added after the LM's vocabulary, <|endofchunk|> first.
    place_open_flamingo_checkpoint(
        model, state_dict, original_vocab_size=model.config.eoc_token_id, init_missing_token_rows=True
    )
