"""Quiet by default: building, training and running a pipeline print only what concerns the user."""

import contextlib
import logging
import warnings

import torch
from transformers import pipeline
from transformers.utils import logging as hf_logging

from conftest import solid
from test_training import caption_table  # noqa: F401  (fixture)
from flaminko import FlaminkoForConditionalGeneration


@contextlib.contextmanager
def transformers_log():
    """Messages of transformers' loggers (which do not propagate to the root logger)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def test_from_backbones_warns_nothing_and_starts_new_rows_at_the_mean(backbones):
    with warnings.catch_warnings(record=True) as caught, transformers_log() as logged:
        warnings.simplefilter("always")
        model, processor = FlaminkoForConditionalGeneration.from_backbones(backbones["vision"], backbones["gpt_neox"])
    assert [r.getMessage() for r in logged if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    original = 403 - 3  # the tiny tokenizer's vocabulary, before <|endofchunk|>, <image> and <PAD>
    assert len(processor.tokenizer) == 403
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert torch.equal(weight[original:], weight[:original].mean(0).expand(3, -1))


def test_pipeline_with_a_plain_prompt_does_not_ask_for_a_chat(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    hf_logging.get_logger("transformers.pipelines.image_text_to_text").warning_once.cache_clear()
    with transformers_log() as logged:
        pipe(images=solid("red"), text="<image>Output:", max_new_tokens=2)
    assert [r.getMessage() for r in logged if r.levelno >= logging.WARNING] == []
    # The conversation template still applies, through the pipeline too, without being advertised.
    assert pipe.processor.chat_template is None
    chat = [{"role": "user", "content": [{"type": "image", "image": solid("red")}, {"type": "text", "text": "색?"}]}]
    assert pipe.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == "User: <image>색?\nAssistant:"
    with transformers_log() as logged:
        pipe(text=chat, max_new_tokens=2)
    assert [r.getMessage() for r in logged if r.levelno >= logging.WARNING] == []


def test_a_cpu_training_run_warns_nothing(backbones, caption_table, tmp_path):  # noqa: F811
    from test_training import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Without use_cpu, as `flaminko train` runs on a machine without a GPU.
        run(backbones, caption_table, tmp_path / "run", steps=4, eval_on_start=False, activation_checkpointing=True,
            use_cpu=False)
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert messages == []


def test_a_training_run_shows_no_bar_per_file_it_writes_and_gives_the_bars_back(backbones, caption_table, tmp_path, capfd):  # noqa: F811
    from test_training import run

    assert hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    # The base model, two checkpoints and the final model are written.
    run(backbones, caption_table, tmp_path / "run", steps=4, eval_on_start=False, save_strategy="steps", save_steps=2)
    shown = capfd.readouterr()
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and (tmp_path / "run" / "final").is_dir()
    assert "Writing model shards" not in shown.err + shown.out
    # The Trainer's own bar stays, and a user's own save afterwards shows transformers' bar again.
    assert "4/4" in shown.err
    assert hf_logging.is_progress_bar_enabled()
