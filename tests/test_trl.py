"""TRL's trainers on Flaminko, with their default settings but for the run's size (2 steps of 2 samples, on
the CPU): SFT (full and LoRA), DPO and GRPO train a tiny model loaded from its folder, TRL's fused loss going
through transformers' base-model convention (`base_model` + `get_output_embeddings()`)."""

import pytest
import torch

from conftest import build_model, solid

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

COLOURS = {"빨간색": "red", "파란색": "blue", "초록색": "green"}


def question(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


QUESTION = question("무슨 색?")


def answer(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def conversations():
    """A conversational vision dataset as TRL reads it: `messages` with image parts, one image each."""
    rows = [
        {"messages": QUESTION + answer(f"{name} 네모"), "images": [solid(colour, (32, 32))]}
        for name, colour in list(COLOURS.items()) * 2
    ]
    return datasets.Dataset.from_list(rows)


def preferences():
    names = list(COLOURS)
    rows = [
        {
            "prompt": QUESTION,
            "chosen": answer(f"{name} 네모"),
            "rejected": answer(f"{names[(index + 1) % len(names)]} 네모"),
            "images": [solid(COLOURS[name], (32, 32))],
        }
        for index, name in enumerate(names * 2)
    ]
    return datasets.Dataset.from_list(rows)


# Each of a different length, so that any two prompts GRPO generates for together differ in length.
QUESTIONS = ["색?", "무슨 색?", "무슨 색이야?", "이건 무슨 색?", "이 네모는 무슨 색?", "그림 속 네모는 무슨 색이야?"]


def image_prompts():
    colours = list(COLOURS.values()) * 2
    return datasets.Dataset.from_list(
        [{"prompt": question(text), "images": [solid(colour, (32, 32))]} for text, colour in zip(QUESTIONS, colours)]
    )


def common_args(tmp_path):
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def snapshot(model):
    """The weights as they are, and the names of the trainable ones."""
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    return weights, {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def assert_trained_only_the_trainable(model, before, trainable_before):
    """Every weight that was trainable and is a Flamingo part (resampler, gated blocks) moved; every weight
    that was frozen stayed, and so did the embedding rows of the LM's own tokens (only <image> and
    <|endofchunk|> train)."""
    after = dict(model.named_parameters())
    frozen_moved = [n for n, p in before.items() if n not in trainable_before and not torch.equal(p, after[n])]
    assert not frozen_moved, frozen_moved
    embeddings = next(n for n, p in after.items() if p is model.get_input_embeddings().weight)
    own_rows = min(model.config.media_token_id, model.config.eoc_token_id)
    assert torch.equal(before[embeddings][:own_rows], after[embeddings][:own_rows])
    flamingo_parts = [n for n in trainable_before if n.startswith(("perceiver.", "cross_attn_layers."))]
    assert flamingo_parts
    unmoved = [n for n in flamingo_parts if torch.equal(before[n], after[n])]
    assert not unmoved, unmoved


@pytest.fixture
def model_and_processor(backbones, tmp_path):
    """A saved Flaminko loaded back as a user loads one (DPO builds its reference model from the folder)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = build_model(backbones)
    model.save_pretrained(tmp_path / "flaminko")
    processor.save_pretrained(tmp_path / "flaminko")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "flaminko")
    return model.train(), AutoProcessor.from_pretrained(tmp_path / "flaminko")


def test_sft_trains_and_its_fused_loss_is_flaminkos_loss(model_and_processor, tmp_path):
    model, processor = model_and_processor
    before, trainable = snapshot(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**common_args(tmp_path)),
        train_dataset=conversations(),
        processing_class=processor,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["input_ids"] == model.config.media_token_id).any() and batch["pixel_values"].ndim == 5
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))
        own = model(**batch).loss
    torch.testing.assert_close(fused, own, rtol=0, atol=1e-5)
    trainer.train()
    assert_trained_only_the_trainable(model, before, trainable)


def test_sft_with_lora(model_and_processor, tmp_path):
    from flaminko.training import lora_config

    model, processor = model_and_processor
    before, _ = snapshot(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**common_args(tmp_path)),
        train_dataset=conversations(),
        processing_class=processor,
        peft_config=lora_config(model, r=4, alpha=8),
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert adapters
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(adapters[n], p)]
    assert moved
    merged = trainer.model.merge_and_unload()
    after = dict(merged.named_parameters())
    # LoRA leaves the vision tower as it was; the gated blocks (modules_to_save) trained.
    vision = [n for n in before if n.startswith("vision_model.")]
    assert all(torch.equal(before[n], after[n]) for n in vision)
    assert not torch.equal(before["cross_attn_layers.0.attn.to_q.weight"], after["cross_attn_layers.0.attn.to_q.weight"])


def test_dpo_trains_on_image_preference_pairs(model_and_processor, tmp_path):
    model, processor = model_and_processor
    before, trainable = snapshot(model)
    trainer = trl.DPOTrainer(
        model=model,
        args=trl.DPOConfig(**common_args(tmp_path)),
        train_dataset=preferences(),
        processing_class=processor,
    )
    trainer.train()
    assert_trained_only_the_trainable(model, before, trainable)


def test_grpo_generates_with_the_images_and_trains(model_and_processor, tmp_path):
    model, processor = model_and_processor
    before, trainable = snapshot(model)
    images_seen, prompts_seen = [], []
    generate = model.generate

    def generate_and_record(*args, **kwargs):
        images_seen.append(kwargs.get("pixel_values"))
        prompts_seen.append([ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])])
        return generate(*args, **kwargs)

    model.generate = generate_and_record

    def length(completions, **_):
        # Sampled completions of one prompt differ in length: the advantages are not all zero.
        return [float(len(completion[0]["content"])) for completion in completions]

    # Two prompts a generation: each must reach generate as its own tokens, none of the other's padding.
    args = trl.GRPOConfig(**common_args(tmp_path), num_generations=4, generation_batch_size=8, max_completion_length=6)
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=length,
        args=args,
        train_dataset=image_prompts(),
        processing_class=processor,
    )
    trainer.train()
    assert images_seen and all(pixels is not None and pixels.ndim == 5 for pixels in images_seen)
    image = solid("red", (32, 32))
    alone = [
        processor(text=processor.apply_chat_template(question(text), add_generation_prompt=True, tokenize=False), images=[image])[
            "input_ids"
        ][0].tolist()
        for text in QUESTIONS
    ]
    assert all(len({len(ids) for ids in rows}) == 2 for rows in prompts_seen), prompts_seen
    assert all(ids in alone for rows in prompts_seen for ids in rows), (prompts_seen, alone)
    assert_trained_only_the_trainable(model, before, trainable)
