"""The conventions transformers' own models follow (transformers' common model tests, issue 21),
checked on the tiny LLaMA-based model: each test names the behaviour it keeps."""

import inspect
import json

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from conftest import build_model, noise_image
from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration, FlaminkoModel, FlaminkoProcessor
from flaminko.tiny import TEXT_FAMILIES

PROMPT = "<image>빨간색 원<|endofchunk|><image>파란색"


@pytest.fixture(scope="module")
def llama(backbones):
    model, processor = build_model(backbones, "llama")
    # Trained apart from the other new tokens, so that inputs_embeds show where the images go.
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.media_token_id] += 1.0
    return model, processor


@pytest.fixture
def batch(llama):
    _, processor = llama
    return processor(text=PROMPT, images=[noise_image(1), noise_image(2)])


def new_tokens(model, batch, **kwargs):
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def test_get_image_features_returns_vision_tokens_and_latents(llama, batch):
    model, _ = llama
    config = model.config
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"])
    assert isinstance(features, BaseModelOutputWithPooling)
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert features.last_hidden_state.shape == (1, 2, 1, patches, config.vision_config.hidden_size)
    assert features.pooler_output.shape == (1, 2 * config.perceiver_num_latents, config.vision_config.hidden_size)
    assert features.hidden_states is None and features.attentions is None


def test_get_image_features_gives_one_2d_array_per_sample_that_forward_and_generate_take_back(llama):
    """transformers 5.25's layout (test_get_image_features_pooler_output): one entry per sample, 2-D, its
    images' latents in order; what a user gets back goes in again as image_features."""
    model, processor = llama
    batch = processor(text=[PROMPT, "글 먼저<image>파란색"], images=[[noise_image(1), noise_image(2)], [noise_image(3)]])
    text = {name: value for name, value in batch.items() if name != "pixel_values"}
    with torch.no_grad():
        latents = model.get_image_features(batch["pixel_values"]).pooler_output
        assert len(latents) == 2 and latents[0].shape == (2 * model.config.perceiver_num_latents, model.config.vision_config.hidden_size)
        assert torch.equal(model(**text, image_features=latents).logits, model(**batch).logits)
    for strategy in ({"do_sample": False}, {"num_beams": 2}):
        expected = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, **strategy)
        assert torch.equal(model.generate(**text, image_features=latents, max_new_tokens=5, min_new_tokens=5, **strategy), expected)


def test_get_image_features_returns_the_towers_hidden_states_and_attentions_when_asked(llama, batch):
    model, _ = llama
    layers = model.config.vision_config.num_hidden_layers
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            features = model.get_image_features(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
            plain = model.get_image_features(batch["pixel_values"])
    finally:
        model.set_attn_implementation(original)
    assert len(features.hidden_states) == layers + 1 and len(features.attentions) == layers
    # One row per image.
    assert features.hidden_states[0].shape[0] == 2
    assert torch.equal(features.pooler_output, plain.pooler_output)


def test_get_image_features_gives_a_tuple_with_return_dict_false(llama, batch):
    model, _ = llama
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"], return_dict=False)
        latents = model.get_image_features(batch["pixel_values"]).pooler_output
    assert isinstance(features, tuple)
    assert torch.equal(features[1], latents)


def test_the_output_carries_the_image_outputs(llama, batch):
    model, _ = llama
    with torch.no_grad():
        out = model(**batch)
    assert isinstance(out.image_outputs, BaseModelOutputWithPooling)
    assert out.image_outputs.pooler_output is out.image_features
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"], image_features=out.image_features).image_outputs is None


def test_return_dict_false_gives_a_tuple(llama, batch):
    model, _ = llama
    with torch.no_grad():
        out = model(**batch)
        as_tuple = model(**batch, return_dict=False, use_cache=False)
        with_loss = model(**batch, labels=batch["input_ids"], return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], out.logits)
    assert torch.equal(with_loss[1], out.logits) and with_loss[0].ndim == 0


def test_forward_takes_transformers_keyword_arguments(llama):
    model, _ = llama
    annotation = inspect.signature(type(model).forward).parameters["kwargs"].annotation
    assert annotation == Unpack[TransformersKwargs]


def test_inputs_embeds_give_the_logits_of_input_ids(llama, batch):
    model, _ = llama
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        from_ids = model(**batch).logits
        from_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    assert torch.allclose(from_ids, from_embeds.logits, atol=1e-5)
    assert torch.equal(from_embeds.image_token_count, torch.tensor([2]))


def test_generate_from_inputs_embeds_gives_the_tokens_of_input_ids(llama, batch):
    model, _ = llama
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        max_new_tokens=5, do_sample=False,
    )
    assert torch.equal(from_embeds, new_tokens(model, batch))


def test_inputs_embeds_cannot_place_images_while_new_token_rows_are_equal(backbones):
    model, processor = build_model(backbones, "llama")
    batch = processor(text=PROMPT, images=[noise_image(1), noise_image(2)])
    with pytest.raises(ValueError, match="another token has the embedding of <image>"):
        model(inputs_embeds=model.get_input_embeddings()(batch["input_ids"]), pixel_values=batch["pixel_values"])


def test_input_ids_with_inputs_embeds_feed_the_embeddings_and_place_the_images_by_the_ids(backbones):
    """As transformers' decoder-only models take a prompt given both ways (generate keeps the ids for its
    output), on a model whose <image> row the embeddings alone could not tell apart: the ids place the
    images, in the prompt and in every decoding step after it."""
    model, processor = build_model(backbones, "llama")
    batch = processor(text=[PROMPT, "글 먼저<image>파란색"], images=[[noise_image(1), noise_image(2)], [noise_image(3)]])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        from_ids = model(**batch).logits
        assert torch.allclose(model(**batch, inputs_embeds=embeds).logits, from_ids, atol=1e-5)
        assert not torch.allclose(model(**batch, inputs_embeds=embeds + 0.1).logits, from_ids, atol=1e-3)
    for strategy in ({"do_sample": False}, {"num_beams": 2}):
        expected = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, **strategy)
        both = model.generate(**batch, inputs_embeds=embeds, max_new_tokens=5, min_new_tokens=5, **strategy)
        assert torch.equal(both, expected)


def test_inputs_embeds_are_checked_at_the_boundary(llama, batch):
    model, _ = llama
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="Pass input_ids or inputs_embeds"):
        model(pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        model(inputs_embeds=embeds[..., :3])
    with pytest.raises(ValueError, match="given together, they are one prompt"):
        model(input_ids=batch["input_ids"][:, 1:], inputs_embeds=embeds)
    with pytest.raises(ValueError, match="given together, they are one prompt"):
        model.generate(input_ids=batch["input_ids"][:, 1:], inputs_embeds=embeds, max_new_tokens=2)


def test_generate_without_a_prompt_starts_from_bos(llama):
    model, _ = llama
    out = model.generate(max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4)
    assert out[0, 0] == model.generation_config.bos_token_id


def test_assisted_decoding_keeps_the_images_at_every_step(llama, batch):
    model, _ = llama
    # A draft model of the same weights: every drafted token is accepted only if it read the images too.
    assistant = FlaminkoForConditionalGeneration(model.config)
    assistant.load_state_dict(model.state_dict())
    assisted = new_tokens(model, batch, assistant_model=assistant.eval())
    assert torch.equal(assisted, new_tokens(model, batch))


def test_from_pretrained_returns_the_loading_info_when_asked(llama, tmp_path):
    model, _ = llama
    model.save_pretrained(tmp_path)
    loaded, info = FlaminkoForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not any(p.requires_grad for p in loaded.language_model.lm_head.parameters())
    assert all(p.requires_grad for p in loaded.perceiver.parameters())


def test_meta_device_loading_gives_clips_own_initialisation(llama):
    config = llama[0].config
    model = FlaminkoForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    vision = config.vision_config
    # CLIP draws its attention input projections with std hidden^-0.5 * (2 * layers)^-0.5, not the generic 0.02.
    expected = vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5 * vision.initializer_factor
    tower = getattr(model.vision_model, "vision_model", model.vision_model)
    weights = torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in tower.encoder.layers])
    assert abs(float(weights.std()) - expected) < 0.25 * expected


def test_gated_blocks_are_gradient_checkpointing_layers(llama):
    model, _ = llama
    blocks = list(model.cross_attn_layers.values())
    assert all(isinstance(block, GradientCheckpointingLayer) for block in blocks)
    model.activation_checkpointing_enable()
    try:
        assert all(block.gradient_checkpointing for block in blocks)
    finally:
        model.activation_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in blocks)


# The processor


def test_processor_call_takes_processing_kwargs(llama):
    _, processor = llama
    parameters = inspect.signature(FlaminkoProcessor.__call__).parameters
    explicit = [p for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD]
    assert all(p.default is None for p in explicit)
    assert "drop_truncated_images" in processor.valid_processor_kwargs.__annotations__


def test_image_arguments_reach_the_image_processor(llama):
    _, processor = llama
    plain = processor(text="<image>", images=[noise_image(1)])["pixel_values"]
    unnormalised = processor(text="<image>", images=[noise_image(1)], do_normalize=False)["pixel_values"]
    grouped = processor(text="<image>", images=[noise_image(1)], images_kwargs={"do_normalize": False})["pixel_values"]
    assert plain.min() < 0 and unnormalised.min() >= 0
    assert torch.equal(unnormalised, grouped)


def test_text_arguments_grouped_or_not_reach_the_tokenizer(llama):
    _, processor = llama
    flat = processor(text="<image>빨간색", images=[noise_image(1)], padding="max_length", max_length=12)
    grouped = processor(
        text="<image>빨간색", images=[noise_image(1)], text_kwargs={"padding": "max_length", "max_length": 12}
    )
    assert flat["input_ids"].shape == grouped["input_ids"].shape == (1, 12)
    with pytest.raises(ValueError, match="passed two times"):
        processor(text="<image>", images=[noise_image(1)], padding=True, text_kwargs={"padding": True})


def test_the_tokenizers_own_settings_are_the_processors_defaults(llama, tmp_path):
    _, processor = llama
    processor.tokenizer.save_pretrained(tmp_path)
    tokenizer = type(processor.tokenizer).from_pretrained(tmp_path, padding="max_length", max_length=20)
    padded = FlaminkoProcessor(processor.image_processor, tokenizer)(text="<image>", images=[noise_image(1)])
    assert padded["input_ids"].shape == (1, 20)


def test_processor_returns_numpy_when_asked(llama):
    _, processor = llama
    out = processor(text="<image>빨간색", images=[noise_image(1)], return_tensors="np")
    assert type(out["input_ids"]).__module__ == "numpy" and type(out["pixel_values"]).__module__ == "numpy"


def test_decoding_keeps_special_tokens_by_default_like_the_tokenizer(llama):
    _, processor = llama
    ids = [[processor.image_token_id, 5, 6, processor.end_of_chunk_token_id]]
    assert processor.batch_decode(ids) == processor.tokenizer.batch_decode(ids)
    assert processor.decode(ids[0]).startswith("<image>")


def test_processor_to_dict_survives_a_save_and_load(llama, tmp_path):
    _, processor = llama
    processor.save_pretrained(tmp_path / "first")
    loaded = FlaminkoProcessor.from_pretrained(tmp_path / "first")
    loaded.save_pretrained(tmp_path / "second")
    again = FlaminkoProcessor.from_pretrained(tmp_path / "second")
    assert loaded.to_dict() == again.to_dict()
    # The folder still carries the remote-code map.
    saved = json.loads((tmp_path / "second" / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing_flaminko.FlaminkoProcessor"


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_base_model_returns_the_hidden_states_the_output_layer_turns_into_the_logits(backbones, family):
    """transformers' base-model convention (what TRL's fused LM head runs): `base_model` is Flaminko without
    the output layer, for every LM family (MPT's tied head included), and a view that adds no parameter."""
    model, processor = build_model(backbones, family)
    names = [name for name, _ in model.named_parameters()]
    batch = processor(text=["<image>빨간색 네모", "파란색 <image>네모 하나"], images=[[noise_image(0)], [noise_image(1)]])
    base = model.base_model
    assert isinstance(base, FlaminkoModel) and not isinstance(base, FlaminkoForConditionalGeneration)
    assert model.base_model is base
    with torch.no_grad():
        output = base(**batch)
        logits = model(**batch).logits
    torch.testing.assert_close(model.get_output_embeddings()(output.last_hidden_state), logits, rtol=0, atol=1e-6)
    assert output.image_token_count.tolist() == [1, 1]
    assert [name for name, _ in model.named_parameters()] == names
    body = f"language_model.{model.language_model.base_model_prefix}."
    head_only = {name for name in model.state_dict() if name.startswith("language_model.") and not name.startswith(body)}
    assert head_only and set(base.state_dict()) == set(model.state_dict()) - head_only


def test_base_model_shares_the_weights_and_the_freezing_and_follows_replaced_modules(llama):
    model, _ = llama
    base = model.base_model
    assert base.perceiver.latents is model.perceiver.latents
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad and n in dict(base.named_parameters())
    }
    original = model.perceiver
    try:
        model.perceiver = torch.nn.Sequential(original)
        assert model.base_model.perceiver is model.perceiver
    finally:
        model.perceiver = original


def test_base_and_whole_model_load_each_others_folders(llama, tmp_path, batch):
    model, _ = llama
    model.base_model.save_pretrained(tmp_path / "base")
    whole, info = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert set(info["missing_keys"]) == {"language_model.lm_head.weight"} and not info["unexpected_keys"]
    model.save_pretrained(tmp_path / "whole")
    base, info = FlaminkoModel.from_pretrained(tmp_path / "whole", output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == {"language_model.lm_head.weight"}
    with torch.no_grad():
        expected = model.base_model(**batch).last_hidden_state
        torch.testing.assert_close(base.eval()(**batch).last_hidden_state, expected, rtol=0, atol=0)
        torch.testing.assert_close(whole.eval().base_model(**batch).last_hidden_state, expected, rtol=0, atol=0)


def test_image_token_id_is_the_media_token_id():
    config = FlaminkoConfig(media_token_id=7)
    assert config.image_token_id == 7
    assert FlaminkoConfig(image_token_id=9).media_token_id == 9
    assert "image_token_id" not in config.to_dict()



def test_rope_scaling_extends_the_context_the_model_accepts():
    from flaminko.input_checks_flaminko import language_model_context
    from flaminko.tiny import tiny_text_config

    config = tiny_text_config("llama", vocab_size=100, max_position_embeddings=64)
    assert language_model_context(config) == 64
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0}
    assert language_model_context(config) == 256
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert language_model_context(config) == 128
    assert language_model_context(tiny_text_config("gpt2", vocab_size=100)) == 512  # learned positions: no more
