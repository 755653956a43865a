"""FlaminkoProcessor: special tokens, image/placeholder matching, padding, decoding, chat template."""

import warnings

import torch
from transformers import AutoProcessor

from conftest import noise_image, solid
from flaminko import FlaminkoProcessor


def test_special_tokens_are_added_in_openflamingo_order(model_and_processor):
    _, processor = model_and_processor
    tokenizer = processor.tokenizer
    eoc, image, pad = tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"])
    assert (image, eoc) == (processor.image_token_id, processor.end_of_chunk_token_id)
    assert eoc + 1 == image and image + 1 == pad == tokenizer.pad_token_id
    ids = tokenizer("<image>빨간색<|endofchunk|>")["input_ids"]
    assert ids[0] == image and ids[-1] == eoc


def test_batches_pad_text_and_images_per_sample(model_and_processor):
    _, processor = model_and_processor
    batch = processor(text=["<image>하나<image>둘<image>셋", "없음", "<image>"], images=[[solid("red")] * 3, [], [solid("blue")]])
    assert batch["pixel_values"].shape == (3, 3, 3, 32, 32)
    assert batch["pixel_values"][1].abs().sum() == 0
    assert batch["pixel_values"][2, 1:].abs().sum() == 0 and batch["pixel_values"][2, 0].abs().sum() > 0
    assert batch["attention_mask"][1, 0] == 0  # left padding, for generation
    assert "pixel_values" not in processor(text="그림 없는 글")


def test_flat_image_list_is_spread_over_the_texts_in_order(model_and_processor):
    _, processor = model_and_processor
    nested = processor(text=["<image>a", "<image><image>b"], images=[[noise_image(1)], [noise_image(2), noise_image(3)]])
    flat = processor(text=["<image>a", "<image><image>b"], images=[noise_image(1), noise_image(2), noise_image(3)])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])


def test_image_files_and_odd_modes_are_read(model_and_processor, tmp_path):
    _, processor = model_and_processor
    path = tmp_path / "gray.png"
    noise_image(4).convert("L").save(path)
    from_path = processor(text="<image>", images=[str(path)])
    from_image = processor(text="<image>", images=[noise_image(4).convert("L")])
    assert torch.equal(from_path["pixel_values"], from_image["pixel_values"])
    rgba = processor(text="<image>", images=[noise_image(5).convert("RGBA")])
    assert rgba["pixel_values"].shape == (1, 1, 3, 32, 32)


def test_a_greyscale_array_is_read_as_a_greyscale_image(model_and_processor):
    import numpy as np

    _, processor = model_and_processor
    grey = noise_image(6).convert("L")
    expected = processor(text="<image>", images=[grey])["pixel_values"]
    pixels = np.array(grey)
    assert pixels.ndim == 2
    for image in (pixels, torch.from_numpy(pixels), pixels.astype(np.float32)):
        assert torch.equal(processor(text="<image>", images=image)["pixel_values"], expected)
    mixed = processor(text=["<image>", "<image>"], images=[pixels, noise_image(6)])["pixel_values"]
    assert torch.equal(mixed[0], expected[0]) and not torch.equal(mixed[1], expected[0])


def test_decoding_drops_special_tokens_when_asked(model_and_processor):
    _, processor = model_and_processor
    ids = processor(text="<image>빨간색 원<|endofchunk|>", images=[solid("red")])["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["빨간색 원"]
    assert processor.decode(ids[0]) == "<image>빨간색 원<|endofchunk|>"


def test_chat_template_places_images_and_closes_answers(model_and_processor):
    _, processor = model_and_processor
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "무엇이 보이나요?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "빨간색 원"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "이것은?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "User: <image>무엇이 보이나요?\nAssistant: 빨간색 원<|endofchunk|>\nUser: <image>이것은?\nAssistant:"
    batch = processor(text=prompt, images=[solid("red"), solid("blue")])
    assert batch["pixel_values"].shape[1] == 2


def test_processor_round_trip(model_and_processor, tmp_path):
    _, processor = model_and_processor
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    text, images = "<image>빨간색<|endofchunk|>", [noise_image(1)]
    a, b = processor(text=text, images=images), loaded(text=text, images=images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.chat_template == processor.chat_template


def test_a_calls_truncation_is_not_saved_as_the_tokenizers_default(model_and_processor, tmp_path):
    _, processor = model_and_processor
    processor(text=["<image>빨간색 원", "<image>파란색"], images=[[solid("red")], [solid("blue")]], truncation=True, max_length=8)
    processor.save_pretrained(tmp_path)
    reloaded = FlaminkoProcessor.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = reloaded(text=["<image>" + " 빨간색 원" * 10, "<image>"], images=[[solid("red")], [solid("blue")]])
    assert batch["input_ids"].shape[1] > 8
