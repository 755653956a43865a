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


HOST_SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")


def host_syncs(call) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        call()
    return sum(event.count for event in profiler.key_averages() if event.key in HOST_SYNCS)


def test_checks_add_no_host_sync_to_a_decoding_step(model_and_processor, batch):
    """The boundary checks read tensor values on the prompt only: a cached decoding step of the model
    syncs the host exactly as often as the bare language model's own step does."""
    import copy

    model, _ = model_and_processor
    with torch.no_grad():
        prompt = model(**batch, use_cache=True)
        bare_prompt = model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
    step = prompt.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)

    def decode():
        model(
            input_ids=step, attention_mask=mask, past_key_values=copy.deepcopy(prompt.past_key_values),
            image_features=prompt.image_features, media_key_values=prompt.media_key_values,
            past_image_token_count=prompt.image_token_count,
        )

    def bare_decode():
        model.language_model(input_ids=step, attention_mask=mask, past_key_values=copy.deepcopy(bare_prompt.past_key_values))

    assert host_syncs(decode) == host_syncs(bare_decode)
    assert host_syncs(lambda: model(**batch)) > host_syncs(
        lambda: model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    )  # the prompt is checked: the profiler sees those reads
