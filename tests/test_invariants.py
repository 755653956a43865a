"""On tiny models: the LM's parameter names stay its own; no conditioning state outlives a call
(threads, nested calls, gradient checkpointing); a sample's output does not depend on its batch; image
work is done once per call; eager and sdpa attention agree."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_model, noise_image, solid
from flaminko import tiny
from flaminko.configuration_flaminko import CACHE_NAME
from flaminko.modeling_flaminko import decoder_layers


PROMPTS = [
    "<image>빨간색 원<|endofchunk|><image>",
    "앞에 쓴 글<image>파란색",
    "<image>",
    "이미지 없는 글",
]


def prompt_images(index):
    count = PROMPTS[index].count("<image>")
    return [noise_image(10 * index + k) for k in range(count)]


@pytest.mark.parametrize("family", tiny.TEXT_FAMILIES)
def test_language_model_parameter_names_are_the_original_ones(backbones, family):
    model, _ = build_model(backbones, family)
    original = AutoModelForCausalLM.from_pretrained(backbones[family])
    inside = {name.removeprefix("language_model.") for name, _ in model.named_parameters() if name.startswith("language_model.")}
    assert inside == {name for name, _ in original.named_parameters()}
    assert set(model.language_model.state_dict()) == set(original.state_dict())


@pytest.mark.parametrize("family", tiny.TEXT_FAMILIES)
def test_closed_gates_give_exactly_the_bare_language_model(backbones, family):
    model, processor = build_model(backbones, family, gates=0.0)
    bare = AutoModelForCausalLM.from_config(model.config.text_config)
    bare.load_state_dict(model.language_model.state_dict())
    bare.eval()
    batch = processor(text=PROMPTS[:2], images=[prompt_images(0), prompt_images(1)])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, theirs)


def test_open_gates_make_the_images_matter(model_and_processor):
    model, processor = model_and_processor
    first = processor(text=PROMPTS[1], images=[solid("red")])
    second = processor(text=PROMPTS[1], images=[solid("green")])
    with torch.no_grad():
        a, b = model(**first).logits, model(**second).logits
    # Text before the first <image> gets no visual signal; from the <image> token on, it does.
    image_at = (first["input_ids"][0] == model.config.media_token_id).nonzero()[0].item()
    assert torch.equal(a[0, :image_at], b[0, :image_at])
    assert (a[0, image_at:] - b[0, image_at:]).abs().max() > 1e-3


def test_cached_and_uncached_greedy_decoding_agree(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text=PROMPTS[:2], images=[prompt_images(0), prompt_images(1)])
    cached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None)
    uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False, eos_token_id=None)
    assert torch.equal(cached, uncached)


def test_manual_cached_decoding_matches_full_forward(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text=PROMPTS[1], images=prompt_images(1))
    ids = batch["input_ids"]
    with torch.no_grad():
        full = model(**batch).logits
        first = model(input_ids=ids[:, :-3], pixel_values=batch["pixel_values"], use_cache=True)
        rest = model(
            input_ids=ids[:, -3:],
            cache=getattr(first, CACHE_NAME),
            image_features=first.image_features,
            media_key_values=first.media_key_values,
            past_image_token_count=first.image_token_count,
            use_cache=True,
        )
    assert torch.allclose(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5)


def test_image_work_runs_once_per_generate_call(model_and_processor):
    model, processor = model_and_processor
    calls = {"vision": 0, "perceiver": 0, "media_projection": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    handles = [
        model.vision_model.register_forward_hook(count("vision")),
        model.perceiver.register_forward_hook(count("perceiver")),
    ]
    handles += [block.attn.to_kv.register_forward_hook(count("media_projection")) for block in model.cross_attn_layers.values()]
    batch = processor(text=PROMPTS[:2], images=[prompt_images(0), prompt_images(1)])
    images_seen = []
    handles.append(model.vision_model.register_forward_pre_hook(lambda module, args, kwargs: images_seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True))
    for kwargs in ({"do_sample": False}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 3}):
        calls.update(vision=0, perceiver=0, media_projection=0)
        images_seen.clear()
        model.generate(**batch, max_new_tokens=8, min_new_tokens=8, **kwargs)
        assert calls == {"vision": 1, "perceiver": 1, "media_projection": len(model.cross_attn_layers)}
        # Beams share their prompt's images: 2 prompts x 2 image slots, whatever the number of beams.
        assert images_seen == [4]
    for handle in handles:
        handle.remove()


def test_a_sample_decodes_the_same_alone_and_left_padded_in_a_batch(model_and_processor):
    model, processor = model_and_processor
    images = [prompt_images(i) for i in range(len(PROMPTS))]
    together = model.generate(**processor(text=PROMPTS, images=images), max_new_tokens=10, do_sample=False, eos_token_id=None)
    for index, prompt in enumerate(PROMPTS):
        alone = model.generate(**processor(text=prompt, images=images[index]), max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert together[index, -10:].tolist() == alone[0, -10:].tolist(), prompt


@pytest.mark.parametrize("family", ["gpt_neox", "mpt"])
def test_threads_sharing_one_model_get_their_own_answers(backbones, family):
    model, processor = build_model(backbones, family)
    jobs = [processor(text=PROMPTS[i], images=prompt_images(i)) for i in range(len(PROMPTS))]
    expected = [model.generate(**job, max_new_tokens=8, do_sample=False) for job in jobs]
    results = [[None] * len(jobs) for _ in range(3)]
    barrier = threading.Barrier(3 * len(jobs))

    def run(round_index, job_index):
        barrier.wait()
        results[round_index][job_index] = model.generate(**jobs[job_index], max_new_tokens=8, do_sample=False)

    threads = [threading.Thread(target=run, args=(r, j)) for r in range(3) for j in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for round_results in results:
        for got, want in zip(round_results, expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["gpt_neox", "gptj"])
def test_nested_call_from_inside_a_layer_does_not_leak_media(backbones, family):
    model, processor = build_model(backbones, family)
    outer = processor(text=PROMPTS[0], images=prompt_images(0))
    inner = processor(text=PROMPTS[1], images=prompt_images(1))
    with torch.no_grad():
        expected_outer, expected_inner = model(**outer).logits, model(**inner).logits
        seen = {}

        def nested(module, args, kwargs):
            if "inner" not in seen:
                seen["inner"] = None
                seen["inner"] = model(**inner).logits

        handle = decoder_layers(model.language_model)[1].register_forward_pre_hook(nested, with_kwargs=True)
        got_outer = model(**outer).logits
        handle.remove()
    assert torch.allclose(got_outer, expected_outer, atol=1e-6)
    assert torch.allclose(seen["inner"], expected_inner, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "mpt"])
def test_gradient_checkpointing_gives_the_same_gradients(backbones, family):
    model, processor = build_model(backbones, family)
    batch = processor(text=PROMPTS[:2], images=[prompt_images(0), prompt_images(1)])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def gradients():
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    model.activation_checkpointing_disable()
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("cross_attn_layers") for name in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "qwen2"])
def test_eager_and_sdpa_agree(backbones, family, tmp_path):
    model, processor = build_model(backbones, family)
    model.save_pretrained(tmp_path)
    batch = processor(text=PROMPTS[:2], images=[prompt_images(0), prompt_images(1)])
    logits = {}
    for implementation in ("eager", "sdpa"):
        loaded = type(model).from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        assert loaded.language_model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded(**batch).logits
    real = batch["attention_mask"].bool()
    assert (logits["eager"][real] - logits["sdpa"][real]).abs().max() <= 1e-5


def test_set_attn_implementation_switches_every_part(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text=PROMPTS[0], images=prompt_images(0))
    with torch.no_grad():
        before = model(**batch).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        assert model.language_model.config._attn_implementation == "eager"
        assert model.vision_model.config._attn_implementation == "eager"
        after = model(**batch).logits
        model.set_attn_implementation("sdpa")
    assert (before - after).abs().max() <= 1e-5
