"""open_clip visual towers -> HF CLIP, against open_clip's own VisionTransformer."""

import importlib.util

import pytest
import torch
from transformers import CLIPVisionModel

from flaminko.cli import main
from flaminko.conversion.open_clip import save_open_clip_visual_as_hf
from flaminko.conversion.reference import open_clip_transformer

# Only this file needs open_clip; the CLI's --verify with an HF CLIP is tested in test_conversion_open_flamingo.py.
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open_clip_torch is the oracle here: pip install --no-deps open_clip_torch==3.3.0", allow_module_level=True)


def test_open_clip_tower_converts_to_the_same_features(tmp_path):
    transformer = open_clip_transformer()
    torch.manual_seed(0)
    tower = transformer.VisionTransformer(
        image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=16,
        output_tokens=True, act_layer=transformer.QuickGELU,
    ).eval()
    path = tmp_path / "visual.pt"
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, path)
    folder = save_open_clip_visual_as_hf(path, tmp_path / "hf")
    clip = CLIPVisionModel.from_pretrained(folder).eval()
    assert (clip.config.hidden_size, clip.config.num_hidden_layers, clip.config.image_size) == (128, 2, 32)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, tokens = tower(images)  # open_clip 3.x: patch tokens after ln_post
        hidden = clip(pixel_values=images).last_hidden_state
        ours = clip.post_layernorm(hidden)[:, 1:]
    assert (ours - tokens).abs().max() <= 1e-5


def open_clip_file(tmp_path):
    """(a tiny HF CLIP folder with open_clip's head width of 64, the same tower saved as open_clip names it)."""
    from flaminko import tiny
    from flaminko.checkpoint_mapping_flaminko import open_clip_visual_to_hf

    torch.manual_seed(0)
    folder = tiny.save_tiny_vision(tmp_path / "hf-vision", hidden_size=128, num_attention_heads=2)
    clip = CLIPVisionModel.from_pretrained(folder)
    hf = clip.state_dict()
    transformer = open_clip_transformer()
    config = clip.config
    tower = transformer.VisionTransformer(
        image_size=config.image_size, patch_size=config.patch_size, width=config.hidden_size,
        layers=config.num_hidden_layers, heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size, output_dim=16, output_tokens=True,
    )
    state = {}
    for name in tower.state_dict():
        converted, _ = open_clip_visual_to_hf({name: tower.state_dict()[name]})
        if name.endswith("in_proj_weight") or name.endswith("in_proj_bias"):
            kind = name.rsplit("_", 1)[-1]
            prefix = name.split(".attn.")[0].replace("transformer.resblocks", "encoder.layers")
            state[name] = torch.cat([hf[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        elif converted:
            (hf_name,) = converted
            state[name] = hf[hf_name].reshape(tower.state_dict()[name].shape)
        else:
            state[name] = tower.state_dict()[name]  # proj: not read by Flamingo
    path = tmp_path / "visual.pt"
    torch.save({f"visual.{k}": v for k, v in state.items()}, path)
    return folder, path


@pytest.mark.parametrize("convention", ["openflamingo", "open_clip-2.23", "open_clip-2.29"])
def test_cli_verifies_against_open_clips_own_tower_in_each_convention(backbones, tmp_path, capsys, convention):
    from test_conversion_open_flamingo import save_like_open_flamingo_training, trained_reference

    folder, path = open_clip_file(tmp_path)
    reference = trained_reference({"vision": folder, "gpt_neox": backbones["gpt_neox"]}, "gpt_neox", 1, seed=5)
    checkpoint = save_like_open_flamingo_training(reference, tmp_path / "run")
    argv = ["convert", "open-flamingo", "--checkpoint", str(checkpoint), "--vision", str(path),
            "--lm", str(backbones["gpt_neox"]), "--init-missing-token-rows", "--vision-convention", convention,
            "--verify", "--out", str(tmp_path / "out")]
    main(argv)
    printed = capsys.readouterr().out
    difference = float(printed.split("max |logits diff| vs reference:")[1].split()[0])
    assert difference <= 1e-4
    from flaminko import FlaminkoForConditionalGeneration

    model = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.vision_feature_post_layernorm == (convention != "openflamingo")
    assert model.config.vision_config.hidden_act == ("gelu" if convention == "open_clip-2.29" else "quick_gelu")


def test_the_conventions_give_different_features(tmp_path):
    """Converting with the wrong convention is not a rounding matter: the tokens differ."""
    from flaminko.conversion.reference import open_clip_tower

    _, path = open_clip_file(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = {name: open_clip_tower(path, name)(images)[1] for name in ("openflamingo", "open_clip-2.23", "open_clip-2.29")}
    assert not torch.allclose(tokens["openflamingo"], tokens["open_clip-2.23"], atol=1e-2)
    assert not torch.allclose(tokens["open_clip-2.23"], tokens["open_clip-2.29"], atol=1e-3)
