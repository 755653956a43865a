"""open_clip's visual tower (VisionTransformer) -> Hugging Face CLIPVisionModel weights and config."""

import re

from transformers import CLIPVisionConfig

from ..checkpoint_mapping_flaminko import open_clip_visual_to_hf


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


# How OpenFlamingo's training saw the ViT patch tokens under each open_clip version: (CLIP's
# post-layernorm applied to the tokens, the tower's activation when it differs from its weights'
# own). open_clip 2.23 began applying ln_post to the tokens; 2.29 builds ViT-L-14 with plain GELU
# even for the OpenAI weights, which were trained with QuickGELU.
VISION_CONVENTIONS = {
    "openflamingo": (False, None),  # open_clip < 2.23: OpenFlamingo's released models
    "open_clip-2.23": (True, None),  # 2.23 <= open_clip < 2.29
    "open_clip-2.29": (True, "gelu"),  # open_clip >= 2.29
}


def vision_convention(name: str) -> tuple[bool, str | None]:
    if name not in VISION_CONVENTIONS:
        raise ValueError(f"Unknown vision convention {name!r}; expected one of {', '.join(VISION_CONVENTIONS)}")
    return VISION_CONVENTIONS[name]

