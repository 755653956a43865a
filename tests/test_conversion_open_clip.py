"""open_clip visual towers -> HF CLIP, against open_clip's own VisionTransformer."""

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn
from transformers import CLIPVisionModel

from flaminko.cli import main
from flaminko.conversion.open_clip import save_open_clip_visual_as_hf

if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open_clip_torch is the oracle here: pip install --no-deps open_clip_torch==3.3.0", allow_module_level=True)


def open_clip_transformer():
    """open_clip.transformer without the package __init__ (which needs torchvision, absent here);
    the one torchvision name its utils import is stood in for while importing, then removed."""
    names = ("open_clip", "torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules.get(name) for name in names}
    spec = importlib.util.find_spec("open_clip")
    package = types.ModuleType("open_clip")
    package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = nn.BatchNorm2d
    stand_ins = {"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                 "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("open_clip.transformer")
    finally:
        for name in names:
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
        for name in [n for n in sys.modules if n.startswith("open_clip.")]:
            del sys.modules[name]


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


def test_cli_converts_with_an_open_clip_tower_and_verifies(backbones, tmp_path, capsys):
    from test_conversion_open_flamingo import save_like_open_flamingo_training, trained_reference

    reference = trained_reference(backbones, "gpt_neox", 1, seed=5)
    checkpoint = save_like_open_flamingo_training(reference, tmp_path / "run")
    argv = ["convert", "open-flamingo", "--checkpoint", str(checkpoint), "--vision", str(backbones["vision"]),
            "--lm", str(backbones["gpt_neox"]), "--init-missing-token-rows", "--verify", "--out", str(tmp_path / "out")]
    main(argv)
    printed = capsys.readouterr().out
    assert "tensors mapped:" in printed and "bytes written:" in printed
    difference = float(printed.split("max |logits diff| vs reference:")[1].split()[0])
    assert difference <= 1e-4
