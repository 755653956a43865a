"""OpenFlamingo's freezing by default; switchable in the config."""

import pytest

from conftest import build_model, noise_image


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_only_resampler_blocks_and_new_token_rows_train(backbones, family):
    model, processor = build_model(backbones, family)
    names = trainable(model)
    embedding = model.get_input_embeddings().weight
    assert all(n.startswith(("perceiver.", "cross_attn_layers.")) or p is embedding for n, p in model.named_parameters() if n in names)
    assert any(n.startswith("perceiver.") for n in names) and any(n.startswith("cross_attn_layers.") for n in names)
    assert not any(n.startswith("vision_model.") for n in names)
    batch = processor(text="<image>빨간색 원<|endofchunk|><image>파란색", images=[noise_image(1), noise_image(2)])
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    changed_rows = embedding.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert changed_rows == sorted([model.config.media_token_id, model.config.eoc_token_id])
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


def test_freezing_is_switchable_in_the_config(backbones):
    model, _ = build_model(backbones, freeze_language_model=False, freeze_vision_model=False)
    names = trainable(model)
    assert len(names) == len(list(model.parameters()))
    model, _ = build_model(backbones, train_new_token_embeddings=False)
    assert not any(n.startswith("language_model.") for n in trainable(model))


def test_unfreezing_after_use_releases_the_embedding_row_mask(backbones):
    model, processor = build_model(backbones)
    batch = processor(text="<image>빨간색 원<|endofchunk|><image>파란색", images=[noise_image(1), noise_image(2)])
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    model.zero_grad(set_to_none=True)
    model.config.freeze_language_model = False
    model.apply_freezing()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    rows_with_gradient = model.get_input_embeddings().weight.grad.abs().sum(-1).nonzero().numel()
    assert rows_with_gradient > 2
