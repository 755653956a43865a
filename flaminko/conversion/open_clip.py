"""open_clip's visual tower (VisionTransformer) -> Hugging Face CLIPVisionModel weights and config."""

import re

import torch
from transformers import CLIPVisionConfig

_LAYER_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_LEVEL = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# The projection to the joint text-image space: Flamingo reads the tokens before it.
_UNUSED = ("proj",)


def is_open_clip_visual(state_dict: dict) -> bool:
    return any(name.endswith("conv1.weight") for name in state_dict) and any(
        ".resblocks." in name for name in state_dict
    )


def strip_visual_prefix(state_dict: dict) -> dict:
    """Drop a leading `visual.` / `vision_encoder.` so the keys start at the tower."""
    for prefix in ("visual.", "vision_encoder."):
        if all(name.startswith(prefix) for name in state_dict):
            return {name[len(prefix) :]: tensor for name, tensor in state_dict.items()}
    return state_dict


def open_clip_vision_config(state_dict: dict, hidden_act: str = "quick_gelu", head_width: int = 64) -> CLIPVisionConfig:
    """The CLIP vision config that open_clip's tower has; OpenAI weights use QuickGELU."""
    width, _, patch, _ = state_dict["conv1.weight"].shape
    num_positions = state_dict["positional_embedding"].shape[0]
    grid = round((num_positions - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for m in map(re.compile(r"transformer\.resblocks\.(\d+)\.").match, state_dict) if m)
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=width // head_width,
        patch_size=patch,
        image_size=grid * patch,
        hidden_act=hidden_act,
    )


def open_clip_visual_to_hf(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(CLIPVisionModel state dict with transformers 5 names, names it could not place). The
    fused attention input projection is split into q, k and v."""
    converted, unplaced = {}, []
    for name, tensor in state_dict.items():
        if name in _TOP_LEVEL:
            converted[_TOP_LEVEL[name]] = tensor
            continue
        if name in _UNUSED:
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
        elif part in _LAYER_PARTS:
            converted[f"{prefix}.{_LAYER_PARTS[part]}.{kind}"] = tensor
        else:
            unplaced.append(name)
    return converted, unplaced


def save_open_clip_visual_as_hf(path, folder, hidden_act: str = "quick_gelu") -> str:
    """Write an open_clip visual state dict (file) as a Hugging Face CLIP vision folder with an
    image processor; returns the folder. OpenAI CLIP weights use QuickGELU (the default)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    from .checkpoint_io import load_state_dict

    state = strip_visual_prefix(load_state_dict(path))
    if not is_open_clip_visual(state):
        raise ValueError(f"{str(path)!r} is not an open_clip visual tower (no conv1 / transformer.resblocks weights)")
    config = open_clip_vision_config(state, hidden_act=hidden_act)
    converted, unplaced = open_clip_visual_to_hf(state)
    model = CLIPVisionModel(config)
    missing = sorted(set(model.state_dict()) - set(converted))
    if unplaced or missing:
        raise ValueError(f"open_clip tower {str(path)!r}: keys with no place {unplaced}, weights unfilled {missing}")
    model.load_state_dict(converted, strict=False)
    model.save_pretrained(folder)
    size = config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return str(folder)
