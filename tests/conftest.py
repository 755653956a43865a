"""Tiny backbones, saved to folders once per session and loaded back through the real loading code."""

import pytest
import torch
from PIL import Image

from flaminko import FlaminkoForConditionalGeneration, tiny


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    """Folder paths: {"vision": ..., family: ...} for every tiny LM family."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    folders = {"vision": tiny.save_tiny_vision(root / "vision")}
    for family in tiny.TEXT_FAMILIES:
        folders[family] = tiny.save_tiny_language_model(root / family, family)
    return folders


def build_model(backbones, family="gpt_neox", gates=0.5, seed=0, **config_kwargs):
    """A Flaminko model whose gates are open, so the images change the logits."""
    torch.manual_seed(seed)
    model, processor = FlaminkoForConditionalGeneration.from_backbones(
        backbones["vision"], backbones[family], **config_kwargs
    )
    with torch.no_grad():
        for block in model.cross_attn_layers.values():
            block.attn_gate.fill_(gates)
            block.ff_gate.fill_(gates)
    return model.eval(), processor


@pytest.fixture
def model_and_processor(backbones):
    return build_model(backbones)


def solid(color, size=(40, 30)):
    return Image.new("RGB", size, color)


def noise_image(seed, size=(36, 36)):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """The datasets package, its Arrow cache in the test's folder and the Hub unreachable by construction
    (the test is skipped where datasets is not installed)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets
