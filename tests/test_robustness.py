"""Robustness: odd and broken images, property tests of the processor and the media mask,
invariants under load, and training faults (NaN, crash while saving, SIGKILL and resume)."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import build_model, noise_image
from flaminko.data import CaptionTable, FlaminkoCollator
from flaminko.modeling_flaminko import media_attention_mask, media_positions
from flaminko.processing_flaminko import load_image


def gradient(mode, size=(24, 16)):
    if mode == "I;16":
        pixels = torch.arange(size[0] * size[1], dtype=torch.int32).reshape(size[1], size[0]) * 150
        return Image.fromarray(pixels.numpy().astype("uint16"))
    return noise_image(7, size).convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "F"])
def test_every_image_mode_becomes_rgb(model_and_processor, mode):
    _, processor = model_and_processor
    image = gradient(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == image.size
    pixels = processor(text="<image>", images=[image])["pixel_values"]
    assert pixels.shape == (1, 1, 3, 32, 32) and pixels.std() > 0  # 16-bit images are rescaled, not clipped white


def test_transparent_pixels_go_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = noise_image(3, (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(str(path)).size == (20, 40)


@pytest.mark.parametrize("kind", ["truncated", "not an image", "empty"])
def test_broken_files_are_named_and_skipped_in_datasets(model_and_processor, tmp_path, kind):
    _, processor = model_and_processor
    path = tmp_path / "bad.png"
    buffer = io.BytesIO()
    noise_image(1, (64, 64)).save(buffer, format="PNG")
    data = {"truncated": buffer.getvalue()[: len(buffer.getvalue()) // 2], "not an image": b"hello, world", "empty": b""}[kind]
    path.write_bytes(data)
    with pytest.raises(ValueError, match="bad.png"):
        processor(text="<image>", images=[str(path)])
    noise_image(2).save(tmp_path / "good.png")
    (tmp_path / "table.tsv").write_text("image\tcaption\nbad.png\t망가진\ngood.png\t멀쩡한\n", encoding="utf-8")
    table = CaptionTable(tmp_path / "table.tsv")
    collator = FlaminkoCollator(processor)
    batch = collator(list(table))
    skipped = sum(table.skipped.values()) + sum(collator.skipped.values())
    assert skipped == 1 and batch["input_ids"].shape[0] == 1


def test_decompression_bombs_are_refused(model_and_processor, tmp_path):
    _, processor = model_and_processor
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # a few kB on disk, 400 million pixels decoded
    with pytest.raises(ValueError, match="Refusing image file .*bomb.png"):
        processor(text="<image>", images=[str(path)])


def test_text_without_images_and_empty_text(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text="그림 없는 글", images=[])
    assert "pixel_values" not in batch
    assert model.generate(**batch, max_new_tokens=3).shape[0] == 1
    with pytest.raises(ValueError, match="empty"):
        processor(text=["<image>", "  "], images=[[noise_image(1)], []])


def test_text_longer_than_the_context(backbones):
    model, processor = build_model(backbones, "gpt2")  # 512 positions
    long = processor(text="<image>" + " 빨간색" * 600, images=[noise_image(1)])
    with pytest.raises(ValueError, match="exceed the language model's context of 512"):
        model(**long)
    cut = processor(text="<image>" + " 빨간색" * 600, images=[noise_image(1)], truncation=True, max_length=512)
    assert model(**cut).logits.shape[1] == 512


segments = st.lists(st.one_of(st.just(None), st.text(alphabet="가나다라 abc.,!?", min_size=1, max_size=8)), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=segments)
def test_processor_round_trips_random_interleavings(model_and_processor, parts):
    _, processor = model_and_processor
    text = "".join("<image>" if part is None else part for part in parts)
    if not text.strip():
        return
    images = [noise_image(i) for i, part in enumerate(parts) if part is None]
    batch = processor(text=text, images=images)
    ids = batch["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == len(images)
    assert processor.decode(ids, skip_special_tokens=False) == text
    if images:
        assert batch["pixel_values"].shape[1] == len(images)


def reference_mask(input_ids, media_token_id, num_images, num_latents, only_immediate):
    """OpenFlamingo's media mask (its MaskedCrossAttention), written out: text_time = cumsum(<image>); a token sees latents of image j
    when text_time == j (or >= j); rows with text_time == 0 see nothing."""
    text_time = (input_ids == media_token_id).long().cumsum(-1)
    media_time = torch.arange(1, num_images + 1).repeat_interleave(num_latents)
    compare = torch.eq if only_immediate else torch.ge
    allowed = compare(text_time[..., None], media_time)
    return allowed & (text_time > 0)[..., None]


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=3),
    num_latents=st.integers(1, 3),
    only_immediate=st.booleans(),
)
def test_media_mask_equals_the_reference_definition(ids, num_latents, only_immediate):
    input_ids = torch.tensor(ids)
    media = 3
    num_images = max(1, int((input_ids == media).sum(-1).max()))
    mask, has_media = media_attention_mask(media_positions(input_ids, media), num_images, num_latents, only_immediate)
    ours = mask[:, 0] & has_media
    assert torch.equal(ours, reference_mask(input_ids, media, num_images, num_latents, only_immediate))


def test_long_interleaved_prompt_with_17_images(model_and_processor):
    model, processor = model_and_processor
    long_text = "".join(f"<image>그림 {i}<|endofchunk|>" for i in range(17)) + "<image>"
    images = [noise_image(i) for i in range(18)]
    alone = model.generate(**processor(text=long_text, images=images), max_new_tokens=6, do_sample=False, eos_token_id=None)
    together = model.generate(
        **processor(text=[long_text, "<image>짧은 글"], images=[images, [noise_image(50)]]), max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    assert together[0, -6:].tolist() == alone[0, -6:].tolist()


def test_memory_does_not_grow_over_100_generate_calls(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text="<image>빨간색<|endofchunk|><image>", images=[noise_image(1), noise_image(2)])
    process = psutil.Process()
    for _ in range(10):
        model.generate(**batch, max_new_tokens=8)
    before = process.memory_info().rss
    for _ in range(100):
        model.generate(**batch, max_new_tokens=8)
    growth = process.memory_info().rss - before
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


from test_training import caption_table, run  # noqa: E402,F401  (fixture and helper)


class PoisonAtStep:
    """A callback that turns one resampler weight into NaN at a given step."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.perceiver.latents[0, 0] = float("nan")


def test_nan_loss_stops_training_before_it_reaches_a_checkpoint(backbones, caption_table, tmp_path, monkeypatch):  # noqa: F811
    from transformers import TrainerCallback

    from flaminko import training

    original_init = training.FlaminkoTrainer.__init__

    def with_poison(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(type("Poison", (TrainerCallback,), {"on_step_end": PoisonAtStep(3).on_step_end}))

    monkeypatch.setattr(training.FlaminkoTrainer, "__init__", with_poison)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4.*checkpoint-2"):
        run(backbones, caption_table, tmp_path / "nan", steps=8, save_strategy="steps", save_steps=2,
            eval_strategy="no", eval_on_start=False)
    checkpoints = sorted(p.name for p in (tmp_path / "nan").glob("checkpoint-*"))
    assert "checkpoint-2" in checkpoints and "checkpoint-4" not in checkpoints
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan" / "checkpoint-2" / "model.safetensors").values())


def test_a_crash_while_saving_never_leaves_a_half_written_latest_checkpoint(backbones, caption_table, tmp_path, monkeypatch):  # noqa: F811
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    calls = {"n": 0}
    original = Trainer._save_optimizer_and_scheduler

    def crash_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        run(backbones, caption_table, tmp_path / "crash", steps=8, save_strategy="steps", save_steps=2,
            eval_strategy="no", eval_on_start=False)
    assert get_last_checkpoint(str(tmp_path / "crash")).endswith("checkpoint-2")
    assert not (tmp_path / "crash" / "checkpoint-4").exists()
    assert (tmp_path / "crash" / "checkpoint-2" / "optimizer.pt").exists()


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from transformers import TrainerCallback, TrainingArguments
    from flaminko import training
    from flaminko.training import DataArguments, ModelArguments, train

    vision, language, table, out, resume, slow = sys.argv[1:7]

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # The steps this process ran, so the test can tell a resumed run from a fresh one.
            with open(f"{out}/steps-run-by-resume-{resume}.txt", "a") as steps:
                steps.write(f"{state.global_step}\\n")
            time.sleep(float(slow))

    init = training.FlaminkoTrainer.__init__
    def with_slow(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(Slow())
    training.FlaminkoTrainer.__init__ = with_slow
    train(
        ModelArguments(vision_model=vision, language_model=language),
        DataArguments(train_data=table),
        TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3, save_strategy="steps",
                          save_steps=3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                          resume_from_checkpoint=True if resume == "yes" else None),
    )
    """
)


def test_sigkill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(backbones, caption_table, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(KILLABLE)

    def command(out, resume, slow):
        return [sys.executable, str(script), str(backbones["vision"]), str(backbones["gpt_neox"]), str(caption_table), str(out), resume, slow]

    whole = subprocess.run(command(tmp_path / "whole", "no", "0"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    job = subprocess.Popen(command(tmp_path / "killed", "no", "0.5"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-6").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()

    resumed = subprocess.run(command(tmp_path / "killed", "yes", "0"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_steps = (tmp_path / "killed" / "steps-run-by-resume-yes.txt").read_text().split()
    assert resumed_steps == [str(step) for step in range(7, 13)]  # continued after checkpoint-6, not from step 1
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
