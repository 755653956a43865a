"""generate: decoding strategies, streaming, <|endofchunk|>, video frames, OpenFlamingo's arguments."""

import pytest
import torch
from transformers import TextStreamer

from conftest import build_model, noise_image
from flaminko import create_model_and_transforms

PROMPTS = ["<image>빨간색 원<|endofchunk|><image>", "글 먼저<image>파란색"]


def batch_of(processor):
    return processor(text=PROMPTS, images=[[noise_image(1), noise_image(2)], [noise_image(3)]])


def rescored(model, batch, sequences, copies):
    """Log-probabilities of every token of `sequences` under one uncached forward pass: (rows, length - 1)."""
    prompt_length = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"].repeat_interleave(copies, 0), torch.ones_like(sequences[:, prompt_length:])], 1)
    with torch.no_grad():
        logits = model(
            input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            pixel_values=batch["pixel_values"].repeat_interleave(copies, 0),
        ).logits
    return logits[:, :-1].log_softmax(-1), sequences[:, 1:]


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
    """Each strategy does what it says, checked against the model's own log-probabilities of the
    tokens it chose (one uncached forward over the whole output)."""
    model, processor = model_and_processor
    batch = batch_of(processor)
    torch.manual_seed(0)
    out = model.generate(
        **batch, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, output_scores=True, length_penalty=0.0,
        **kwargs,
    )
    sequences = out.sequences
    copies = kwargs.get("num_return_sequences", 1)
    prompt_length = batch["input_ids"].shape[1]
    assert sequences.shape == (2 * copies, prompt_length + 6)
    assert torch.equal(sequences[::copies, :prompt_length], batch["input_ids"])
    log_probs, targets = rescored(model, batch, sequences, copies)
    generated = slice(prompt_length - 1, None)
    chosen = log_probs[:, generated].gather(-1, targets[:, generated, None])[..., 0]
    # min_new_tokens and the <image> suppression rule out these tokens at every generated step.
    banned = [model.config.media_token_id, *model.generation_config.eos_token_id]
    allowed = log_probs[:, generated].clone()
    allowed[..., banned] = float("-inf")
    if kwargs.get("num_beams"):
        # With length_penalty 0 a beam's score is the sum of its tokens' log-probabilities.
        assert torch.allclose(out.sequences_scores, chosen.sum(-1), atol=1e-4)
        for prompt_scores in out.sequences_scores.view(2, copies):
            assert (prompt_scores[:-1] >= prompt_scores[1:]).all()
        if copies > 1:
            assert not torch.equal(sequences[0], sequences[1])
    elif kwargs.get("do_sample"):
        top_k = allowed.topk(kwargs["top_k"], dim=-1).values[..., -1]
        assert (chosen >= top_k - 1e-5).all()  # every sampled token lies in the top k
        torch.manual_seed(0)
        again = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **kwargs)
        assert torch.equal(again, sequences)
    else:
        # Greedy: every token is the most likely allowed one.
        assert torch.allclose(chosen, allowed.max(-1).values, atol=1e-5)


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
    new_text = processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
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
        features = model.get_image_features(frames).pooler_output
        single = model.get_image_features(batch["pixel_values"]).pooler_output
    assert features.shape == single.shape == (1, 2 * model.config.perceiver_num_latents, model.config.vision_config.hidden_size)
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
    new_tokens = out[0, batch["input_ids"].shape[1] :]
    answer = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert batch["pixel_values"].shape[1] == 3
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == 3
    assert answer == processor.tokenizer.decode(new_tokens, skip_special_tokens=True) and len(new_tokens) > 0
    assert model.config.media_token_id not in new_tokens.tolist()
    # The answer reads the query image and, through the demonstrations' text, their images too.
    with torch.no_grad():
        last = model(**batch).logits[0, -1]
        for index, other in ((2, noise_image(9)), (0, noise_image(8))):
            images = [image for image, _ in demos] + [query]
            images[index] = other
            changed = model(**processor(text=prompt, images=images)).logits[0, -1]
            assert not torch.allclose(last, changed, atol=1e-4), index
