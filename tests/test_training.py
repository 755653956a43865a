"""Fine-tuning through the Trainer: it learns, trains only what it should, LoRA round-trips, resumes."""

import csv
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from conftest import solid
from flaminko import FlaminkoForConditionalGeneration, FlaminkoProcessor
from flaminko.training import DataArguments, ModelArguments, train

COLOURS = {"빨간색": "red", "파란색": "blue", "초록색": "green"}


@pytest.fixture(scope="module")
def caption_table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    rng = random.Random(0)
    rows = []
    for index in range(48):
        name = rng.choice(list(COLOURS))
        solid(COLOURS[name], size=(32, 32)).save(folder / f"{index}.png")
        rows.append({"image": f"{index}.png", "caption": f"{name} 네모", "item_url": f"https://shop/{index}"})
    with open(folder / "captions.tsv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["image", "caption", "item_url"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return folder / "captions.tsv"


def run(backbones, table, out, *, model=None, steps=40, **overrides):
    model_args = ModelArguments(
        model_name_or_path=model,
        vision_model=None if model else str(backbones["vision"]),
        language_model=None if model else str(backbones["gpt_neox"]),
        **{k: v for k, v in overrides.items() if k in ModelArguments.__dataclass_fields__},
    )
    data_args = DataArguments(train_data=str(table), eval_fraction=0.25)
    training = {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 5e-3,
        "warmup_steps": 2, "logging_steps": 10, "eval_strategy": "steps", "eval_steps": steps, "eval_on_start": True,
        "save_strategy": "no", "report_to": "none", "seed": 0, "use_cpu": True, "dataloader_num_workers": 0,
    }
    training.update({k: v for k, v in overrides.items() if k not in ModelArguments.__dataclass_fields__})
    return train(model_args, data_args, TrainingArguments(**training))


def eval_losses(trainer):
    return [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]


def test_training_lowers_the_loss_and_changes_only_what_it_should(backbones, caption_table, tmp_path):
    trainer, final = run(backbones, caption_table, tmp_path / "run", steps=40)
    before, *_, after = eval_losses(trainer)
    assert after < before - 0.25, (before, after)  # stated margin: 0.25 nats on held-out captions

    start = load_file(tmp_path / "run" / "base-model" / "model.safetensors")
    end = load_file(final / "model.safetensors")
    assert start.keys() == end.keys()
    model = FlaminkoForConditionalGeneration.from_pretrained(final)
    new_rows = sorted([model.config.media_token_id, model.config.eoc_token_id])
    changed = {name for name in start if not torch.equal(start[name], end[name])}
    assert any(name.startswith("perceiver.") for name in changed)
    assert any(name.startswith("cross_attn_layers.") for name in changed)
    assert not any(name.startswith("vision_model.") for name in changed)
    lm_changed = {name for name in changed if name.startswith("language_model.")}
    assert lm_changed == {"language_model.gpt_neox.embed_in.weight"}
    rows = (start["language_model.gpt_neox.embed_in.weight"] != end["language_model.gpt_neox.embed_in.weight"]).any(-1)
    assert rows.nonzero().flatten().tolist() == new_rows


def test_lora_adapter_reloads_and_merges_to_the_same_logits(backbones, caption_table, tmp_path):
    from peft import PeftModel

    trainer, final = run(backbones, caption_table, tmp_path / "lora", steps=12, use_lora=True)
    processor = FlaminkoProcessor.from_pretrained(final)
    batch = processor(text="<image>빨간색", images=[solid("red")])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**batch).logits
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "lora" / "base-model")
    base = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "lora" / "base-model")
    reloaded = PeftModel.from_pretrained(base, final).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert type(merged) is FlaminkoForConditionalGeneration
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
    with torch.no_grad():
        base_logits = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "lora" / "base-model")(**batch).logits
    assert not torch.allclose(base_logits, expected, atol=1e-3)


def test_lora_merge_option_saves_a_plain_model(backbones, caption_table, tmp_path):
    trainer, final = run(backbones, caption_table, tmp_path / "merged", steps=6, use_lora=True, merge=True, lora_cross_attention=True)
    assert not (final / "adapter_config.json").exists()
    model = FlaminkoForConditionalGeneration.from_pretrained(final).eval()
    assert not any("lora" in name for name in model.state_dict())
    processor = FlaminkoProcessor.from_pretrained(final)
    batch = processor(text="<image>빨간색", images=[solid("blue")])
    base = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "merged" / "base-model").eval()
    with torch.no_grad():
        trained = trainer.model.eval()(**batch).logits
        merged = model(**batch).logits
        untrained = base(**batch).logits
    # The saved weights are the trained adapter merged in, not the base model with the LoRA thrown away.
    assert torch.allclose(merged, trained, atol=1e-4)
    assert not torch.allclose(merged, untrained, atol=1e-3)


def test_resumed_run_continues_from_its_checkpoint(backbones, caption_table, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from flaminko import training

    steps_run = []

    class RecordSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    init = training.FlaminkoTrainer.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(RecordSteps())

    monkeypatch.setattr(training.FlaminkoTrainer, "__init__", recording)
    common = {"steps": 10, "save_strategy": "steps", "save_steps": 5, "eval_strategy": "no", "eval_on_start": False}
    whole, whole_final = run(backbones, caption_table, tmp_path / "whole", **common)
    assert steps_run == list(range(1, 11))
    steps_run.clear()
    resumed, resumed_final = run(
        backbones, caption_table, tmp_path / "whole-copy", model=str(tmp_path / "whole" / "base-model"),
        resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-5"), **common,
    )
    # A fresh rerun would run steps 1..10 and, being deterministic, end with the same weights too.
    assert steps_run == list(range(6, 11))
    assert resumed.state.global_step == 10
    a, b = load_file(whole_final / "model.safetensors"), load_file(resumed_final / "model.safetensors")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_example_config_parses(tmp_path):
    import yaml

    from flaminko.training import parse_arguments

    config = yaml.safe_load(open("examples/train_openflaminko.yaml"))
    config.update(bf16=False, use_cpu=True, output_dir=str(tmp_path))  # the example is for GPUs
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    model_args, data_args, training_args = parse_arguments([str(path)])
    assert model_args.language_model == "EleutherAI/polyglot-ko-1.3b"
    assert data_args.data_format == "webdataset" and data_args.hangul_only
    assert training_args.learning_rate == 1e-4 and training_args.max_steps == 50000


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_checkpointing(backbones, caption_table, tmp_path, precision):
    trainer, final = run(
        backbones, caption_table, tmp_path / precision, steps=4, activation_checkpointing=True, eval_on_start=False,
        logging_steps=2, **{precision: True},
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (final / "model.safetensors").exists()
