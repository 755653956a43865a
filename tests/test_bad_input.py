"""Invariant 8: bad input gets a clear ValueError/TypeError naming the problem."""

import pytest
import torch

from conftest import noise_image
from flaminko import FlaminkoConfig

PROMPT = "<image>빨간색 원<|endofchunk|><image>파란색"


@pytest.fixture
def batch(model_and_processor):
    _, processor = model_and_processor
    return processor(text=PROMPT, images=[noise_image(1), noise_image(2)])


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("<image><image>", [noise_image(1)], "2 <image> tokens but 1 images"),
        ("<image>", [noise_image(1), noise_image(2)], "1 <image> tokens but 2 images"),
        ("그림 없음", [noise_image(1)], "0 <image> tokens but 1 images"),
        (["<image>", "<image>"], [[noise_image(1)]], "Could not match the images to 2 texts"),
    ],
)
def test_processor_image_count_mismatch(model_and_processor, text, images, message):
    _, processor = model_and_processor
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)


def test_processor_needs_text(model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(ValueError, match="needs text"):
        processor(images=[noise_image(1)])
    with pytest.raises(TypeError, match="text must be"):
        processor(text=[1, 2])


def test_unreadable_image_file_is_named(model_and_processor, tmp_path):
    _, processor = model_and_processor
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        processor(text="<image>", images=[str(broken)])


def test_truncation_that_would_drop_an_image_is_refused(model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(ValueError, match="truncation"):
        processor(text="글자 " * 20 + "<image>", images=[noise_image(1)], truncation=True, max_length=5)


def test_pixel_values_of_wrong_rank_or_size(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="must have shape"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][0])
    with pytest.raises(ValueError, match="vision tower expects 3x32x32"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][..., :30, :30])
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.get_image_features([[1.0]])


def test_mismatched_batch_sizes(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="batch size 2 but input_ids has 1"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1, 1))


def test_more_image_tokens_than_images(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="2 <image> tokens but only 1 images"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:, :1])


def test_image_tokens_without_images(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="neither pixel_values nor image_features"):
        model(input_ids=batch["input_ids"])


def test_cached_decoding_without_the_image_count(model_and_processor, batch):
    model, _ = model_and_processor
    out = model(**batch, use_cache=True)
    with pytest.raises(ValueError, match="past_image_token_count"):
        model(input_ids=batch["input_ids"][:, -1:], past_key_values=out.past_key_values, image_features=out.image_features)


def test_pixel_values_and_image_features_together(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="not both"):
        model(**batch, image_features=torch.zeros(1, 2, 64, 32))


@pytest.mark.parametrize(
    "text_config, message",
    [
        ({"model_type": "no-such-lm"}, "does not know"),
        ({"hidden_size": 8}, "needs a 'model_type'"),
    ],
)
def test_unknown_or_unsupported_language_model_family(text_config, message):
    with pytest.raises(ValueError, match=message):
        FlaminkoConfig(text_config=text_config)


def test_vision_config_must_be_clip():
    with pytest.raises(ValueError, match="CLIP vision config"):
        FlaminkoConfig(vision_config={"model_type": "siglip_vision_model"})
