"""Invariant 8: bad input gets a clear ValueError/TypeError naming the problem."""

import pytest
import torch

from conftest import noise_image
from flaminko import FlaminkoConfig
from flaminko.configuration_flaminko import CACHE_NAME

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
        model(input_ids=batch["input_ids"][:, -1:], cache=getattr(out, CACHE_NAME), image_features=out.image_features)


def test_pixel_values_and_image_features_together(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="not both"):
        model(**batch, image_features=torch.zeros(1, 2 * 64, 32))


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
            input_ids=step, attention_mask=mask, cache=copy.deepcopy(getattr(prompt, CACHE_NAME)),
            image_features=prompt.image_features, media_key_values=prompt.media_key_values,
            past_image_token_count=prompt.image_token_count,
        )

    def bare_decode():
        model.language_model(
            input_ids=step, attention_mask=mask, **{CACHE_NAME: copy.deepcopy(getattr(bare_prompt, CACHE_NAME))}
        )

    assert host_syncs(decode) == host_syncs(bare_decode)
    assert host_syncs(lambda: model(**batch)) > host_syncs(
        lambda: model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    )  # the prompt is checked: the profiler sees those reads


# Rows of docs/robustness.md, "Model inputs": each bad value, where it goes in, and the message.
@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda b: {**b, "input_ids": b["input_ids"][0]}, ValueError, r"shape \(batch, sequence\).*input_ids\[None\]"),
        (lambda b: {**b, "input_ids": b["input_ids"].float()}, TypeError, "integer token ids"),
        (lambda b: {**b, "input_ids": b["input_ids"].tolist()}, TypeError, "input_ids must be a torch.Tensor"),
        (lambda b: {**b, "input_ids": b["input_ids"] + 10_000}, ValueError, "outside the vocabulary"),
        (lambda b: {**b, "input_ids": b["input_ids"][:, :0], "attention_mask": None}, ValueError, "input_ids is empty"),
        (lambda b: {**b, "attention_mask": b["attention_mask"][:, 1:]}, ValueError, "attention_mask has shape"),
        (lambda b: {**b, "attention_mask": b["attention_mask"].repeat(2, 1)}, ValueError, "attention_mask must have shape"),
        (lambda b: {**b, "attention_mask": b["attention_mask"].tolist()}, TypeError, "attention_mask must be a torch.Tensor"),
        (lambda b: {**b, "labels": b["input_ids"][:, 1:]}, ValueError, "labels have shape"),
        (lambda b: {**b, "pixel_values": b["pixel_values"].to(torch.uint8)}, TypeError, "float tensor.*processor"),
        (lambda b: {**b, "pixel_values": b["pixel_values"][:, :0]}, ValueError, "hold no image"),
        (lambda b: {**b, "pixel_values": b["pixel_values"].unsqueeze(2)[:, :, :0]}, ValueError, "hold no image"),
        (lambda b: {**b, "pixel_values": b["pixel_values"] * float("nan")}, ValueError, "NaN or infinite"),
        (lambda b: {**b, "pixel_values": b["pixel_values"].clone().index_fill_(-1, torch.tensor([3]), float("inf"))}, ValueError, "NaN or infinite"),
        (lambda b: {**{k: v for k, v in b.items() if k != "pixel_values"}, "image_features": torch.zeros(1, 2 * 64, 7)}, ValueError, r"image_features must be \(batch=1, images \* 64 latents, 32\)"),
        (lambda b: {**{k: v for k, v in b.items() if k != "pixel_values"}, "image_features": torch.zeros(1, 2, 64, 32)}, ValueError, r"image_features must be \(batch=1, images \* 64 latents, 32\)"),
        (lambda b: {**{k: v for k, v in b.items() if k != "pixel_values"}, "image_features": torch.zeros(1, 100, 32)}, ValueError, r"image_features must be \(batch=1, images \* 64 latents, 32\)"),
        (lambda b: {**{k: v for k, v in b.items() if k != "pixel_values"}, "image_features": torch.full((1, 2 * 64, 32), float("nan"))}, ValueError, "image_features contain NaN"),
        (lambda b: {**{k: v for k, v in b.items() if k != "pixel_values"}, "image_features": [[0.0]]}, TypeError, "image_features must be a torch.Tensor"),
    ],
    ids=["1d-ids", "float-ids", "list-ids", "id-beyond-vocab", "empty-ids", "short-mask", "mask-batch", "list-mask",
         "labels-shape", "uint8-pixels", "zero-images", "zero-frames", "nan-pixels", "inf-pixels", "features-dim",
         "features-per-image", "features-part-image", "nan-features", "list-features"],
)
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_model_entry_points_name_bad_values(model_and_processor, batch, change, error, message, entry):
    model, _ = model_and_processor
    inputs = change(dict(batch))
    if "labels" in inputs and entry == "generate":
        pytest.skip("generate takes no labels")
    call = model if entry == "forward" else lambda **kw: model.generate(**kw, max_new_tokens=2)
    with pytest.raises(error, match=message):
        call(**inputs)


def test_get_image_features_names_bad_values(model_and_processor, batch):
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.get_image_features(batch["pixel_values"] * float("inf"))
    with pytest.raises(ValueError, match="hold no image"):
        model.get_image_features(batch["pixel_values"][:0])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cross_attn_every_n_layers": 5}, "cross_attn_every_n_layers=5 places no gated cross-attention block in a language model of 4 layers"),
        ({"cross_attn_every_n_layers": 0}, "cross_attn_every_n_layers must be an int >= 1"),
        ({"cross_attn_layers": []}, "cross_attn_layers is empty"),
        ({"cross_attn_layers": [4]}, r"cross_attn_layers must lie in 0..3"),
        ({"perceiver_depth": 0}, "perceiver_depth must be an int >= 1"),
        ({"perceiver_num_latents": 2.5}, "perceiver_num_latents must be an int >= 1"),
        ({"max_num_frames": 0}, "max_num_frames must be an int >= 1"),
        ({"media_token_id": -1}, "media_token_id must be None or a token id"),
    ],
)
def test_configs_that_cannot_work_are_refused_when_built_and_when_loaded(model_and_processor, tmp_path, settings, message):
    import json

    from flaminko import FlaminkoForConditionalGeneration

    model, _ = model_and_processor
    text_config = model.config.text_config
    with pytest.raises((ValueError, TypeError), match=message):
        FlaminkoConfig(text_config=text_config.to_dict(), **settings)
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, **settings}))
    with pytest.raises((ValueError, TypeError), match=message):
        FlaminkoForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "text, images, error, message",
    [
        (5, None, TypeError, "text must be a string or a non-empty list of strings, got int"),
        (["<image>", None], None, TypeError, "got a list of NoneType, str"),
        ([], None, TypeError, "got an empty list"),
        ("<image>", b"\x89PNG\r\n\x1a\n", TypeError, "raw bytes"),
        ("<image>", [b"\x89PNG"], TypeError, "raw bytes"),
        ("<image>", [None], TypeError, "images hold a NoneType"),
        ("<image>", 3.5, TypeError, "images must be given as a list, got float"),
        ("<image>", "PIL 0x0", ValueError, "0x0 pixels"),
        ("<image>", "array (0, 5, 3)", ValueError, r"shape \(0, 5, 3\)"),
        ("<image>", "array (5,)", ValueError, r"shape \(5,\)"),
        ("<image>", "array (5, 5, 7)", ValueError, r"1, 3 or 4 channels"),
        ("<image>", "array nan", ValueError, "NaN or infinite"),
        ("<image>", "array complex", TypeError, "dtype complex64"),
    ],
)
def test_processor_names_bad_values(model_and_processor, text, images, error, message):
    import numpy as np
    from PIL import Image

    _, processor = model_and_processor
    made = {
        "PIL 0x0": Image.new("RGB", (0, 0)),
        "array (0, 5, 3)": np.zeros((0, 5, 3), np.uint8),
        "array (5,)": np.zeros(5, np.uint8),
        "array (5, 5, 7)": np.zeros((5, 5, 7), np.uint8),
        "array nan": np.full((5, 5, 3), np.nan, np.float32),
        "array complex": np.zeros((5, 5, 3), np.complex64),
    }
    images = made.get(images, images) if isinstance(images, str) else images
    with pytest.raises(error, match=message):
        processor(text=text, images=images)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list of messages"),
        ([{"content": "안녕"}], "Message 0 must be a dict with a role"),
        ([{"role": "robot", "content": "안녕"}], "Message 0 must be a dict with a role"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "content part"),
        ([{"role": "user", "content": [{"type": "text"}]}], "without a 'text' string"),
    ],
)
def test_chat_template_names_malformed_messages(model_and_processor, messages, message):
    _, processor = model_and_processor
    with pytest.raises((ValueError, TypeError), match=message):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_loading_names_missing_folders_and_wrong_backbones(backbones, tmp_path):
    from flaminko import FlaminkoForConditionalGeneration

    with pytest.raises(ValueError, match="vision_model_name_or_path: the folder .*nope.* does not exist"):
        FlaminkoForConditionalGeneration.from_backbones(tmp_path / "nope", backbones["gpt_neox"])
    with pytest.raises(ValueError, match="language_model_name_or_path: the folder .* does not exist"):
        FlaminkoForConditionalGeneration.from_backbones(backbones["vision"], str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds a gpt_neox model, not a CLIP vision tower"):
        FlaminkoForConditionalGeneration.from_backbones(backbones["gpt_neox"], backbones["gpt_neox"])
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        FlaminkoForConditionalGeneration.from_backbones(backbones["vision"], backbones["vision"])
    with pytest.raises(ValueError, match="pretrained_model_name_or_path: the folder .* does not exist"):
        FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "nope")


def test_data_loaders_name_missing_and_broken_files(tmp_path):
    from flaminko.data import CaptionTable, InterleavedDocuments

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"caption": "빨간색", "image": "a.png"}\n{oops\n', encoding="utf-8")
    for loader in (CaptionTable, InterleavedDocuments):
        with pytest.raises(ValueError, match="nope.* does not exist"):
            loader(tmp_path / "nope.jsonl")
        with pytest.raises(ValueError, match="broken.jsonl' line 2 is not JSON"):
            loader(broken)
    with pytest.raises(ValueError, match="nope.tsv' does not exist"):
        CaptionTable(tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match=r"\.tsv, \.csv or \.jsonl"):
        CaptionTable(tmp_path / "table.xlsx")


def test_collator_names_a_batch_whose_every_image_is_unreadable(model_and_processor, tmp_path):
    from flaminko.data import FlaminkoCollator

    _, processor = model_and_processor
    (tmp_path / "bad.png").write_bytes(b"hello")
    collator = FlaminkoCollator(processor)
    with pytest.raises(ValueError, match=r"Every sample of this batch had an unreadable image \(2 samples\)"):
        collator([{"text": "<image>가", "images": [str(tmp_path / "bad.png")]}] * 2)
    assert collator.skipped["unreadable image"] == 2
