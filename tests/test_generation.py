"""generate: decoding strategies, streaming, <|endofchunk|>, video frames, OpenFlamingo's arguments."""

import pytest
import torch
from transformers import TextStreamer

from conftest import build_model, noise_image
from flaminko import create_model_and_transforms

PROMPTS = ["<image>빨간색 원<|endofchunk|><image>", "글 먼저<image>파란색"]


def batch_of(processor):
    return processor(text=PROMPTS, images=[[noise_image(1), noise_image(2)], [noise_image(3)]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": False},
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 20, "num_return_sequences": 3},
    ],
    ids=["greedy", "beam", "beam-2-returned", "sampling-3-returned"],
)
def test_decoding_strategies(model_and_processor, kwargs):
    model, processor = model_and_processor
    batch = batch_of(processor)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **kwargs)
    copies = kwargs.get("num_return_sequences", 1)
    assert out.shape == (2 * copies, batch["input_ids"].shape[1] + 6)
    assert torch.equal(out[::copies, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_beam_search_keeps_each_sample_on_its_own_images(model_and_processor):
    model, processor = model_and_processor
    batch = batch_of(processor)
    together = model.generate(**batch, max_new_tokens=6, num_beams=3, eos_token_id=None)
    alone = model.generate(**processor(text=PROMPTS[1], images=[noise_image(3)]), max_new_tokens=6, num_beams=3, eos_token_id=None)
    assert together[1, -6:].tolist() == alone[0, -6:].tolist()


def test_streaming_prints_the_generated_text(model_and_processor, capsys):
    model, processor = model_and_processor
    batch = processor(text=PROMPTS[0], images=[noise_image(1), noise_image(2)])
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    new_text = processor.decode(out[0, batch["input_ids"].shape[1] :])
    assert printed.strip() == new_text.strip()
    assert printed.strip()


def test_end_of_chunk_ends_generation_by_default(model_and_processor):
    model, processor = model_and_processor
    eoc = model.config.eoc_token_id
    batch = processor(text=PROMPTS[0], images=[noise_image(1), noise_image(2)])
    out = model.generate(**batch, max_new_tokens=10, do_sample=False, sequence_bias={(eoc,): 100.0})
    assert out[0, -1].item() == eoc
    assert out.shape[1] == batch["input_ids"].shape[1] + 1


def test_video_frames_with_frame_embeddings(backbones):
    model, processor = build_model(backbones, max_num_frames=3)
    batch = processor(text=PROMPTS[0], images=[noise_image(1), noise_image(2)])
    frames = torch.stack([batch["pixel_values"], batch["pixel_values"].flip(-1)], dim=2)  # (B, T, F=2, C, H, W)
    with torch.no_grad():
        features = model.get_image_features(frames)
        single = model.get_image_features(batch["pixel_values"])
    assert features.shape == single.shape == (1, 2, model.config.perceiver_num_latents, model.config.vision_config.hidden_size)
    assert not torch.allclose(features, single)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=frames, max_new_tokens=4)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4 or out[0, -1] in model.generation_config.eos_token_id
    too_many = torch.cat([frames, frames], dim=2)
    with pytest.raises(ValueError, match="frames"):
        model.get_image_features(too_many)


def test_openflaminko_readme_runs_with_only_the_import_changed(backbones):
    torch.manual_seed(0)
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=str(backbones["vision"]),
        clip_vision_encoder_pretrained="openai",
        lang_encoder_path=str(backbones["gpt_neox"]),
        tokenizer_path=str(backbones["gpt_neox"]),
        cross_attn_every_n_layers=1,
    )
    model.eval()
    vision_x = [image_processor(noise_image(1)).unsqueeze(0), image_processor(noise_image(2)).unsqueeze(0)]
    vision_x = torch.cat(vision_x, dim=0)
    vision_x = vision_x.unsqueeze(1).unsqueeze(0)
    assert vision_x.shape == (1, 2, 1, 3, 32, 32)
    tokenizer.padding_side = "left"
    lang_x = tokenizer(["<image>해당 이미지는 욕실 세면대입니다.<|endofchunk|><image>해당 이미지는"], return_tensors="pt")
    generated = model.generate(
        vision_x=vision_x, lang_x=lang_x["input_ids"], attention_mask=lang_x["attention_mask"], max_new_tokens=20, num_beams=3
    )
    same = model.generate(
        pixel_values=vision_x, input_ids=lang_x["input_ids"], attention_mask=lang_x["attention_mask"], max_new_tokens=20, num_beams=3
    )
    assert torch.equal(generated, same)
    assert isinstance(tokenizer.decode(generated[0]), str)
    assert model.config.cross_attn_every_n_layers == 1


def test_image_token_is_never_generated(model_and_processor):
    model, processor = model_and_processor
    media = model.config.media_token_id
    batch = processor(text=PROMPTS[0], images=[noise_image(1), noise_image(2)])
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, sequence_bias={(media,): 100.0})
    assert media not in out[0, batch["input_ids"].shape[1] :].tolist()


def test_few_shot_prompt_from_the_readme(model_and_processor):
    model, processor = model_and_processor
    demos = [(noise_image(1), "빨간색 원"), (noise_image(2), "파란색 네모")]
    query = noise_image(3)
    prompt = "".join(f"<image>Output:{caption}<|endofchunk|>" for _, caption in demos) + "<image>Output:"
    batch = processor(text=prompt, images=[image for image, _ in demos] + [query])
    out = model.generate(**batch, max_new_tokens=20, num_beams=3)
    answer = processor.batch_decode(out[:, batch["input_ids"].shape[1] :])[0]
    assert batch["pixel_values"].shape[1] == 3 and isinstance(answer, str)
    assert model.config.media_token_id not in out[0, batch["input_ids"].shape[1] :].tolist()
