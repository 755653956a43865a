"""`flaminko demo`: the whole path offline: backbones -> Flaminko -> save -> Auto reload -> generate."""

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

from . import tiny
from .modeling_flaminko import FlaminkoForConditionalGeneration

COLOURS = {"빨간색": (220, 30, 30), "파란색": (30, 60, 220), "초록색": (30, 170, 60)}


def shape_image(colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((12, 12, size - 12, size - 12), fill=COLOURS[colour])
    return image


def run_demo(out: str = "flaminko-demo", seed: int = 0) -> list[str]:
    out = Path(out)
    torch.manual_seed(seed)
    print(f"1/4 tiny CLIP vision tower and Polyglot-style GPT-NeoX LM (tokenizer trained locally) -> {out}")
    vision = tiny.save_tiny_vision(out / "backbones" / "vision")
    language = tiny.save_tiny_language_model(out / "backbones" / "language-model", "gpt_neox")

    print("2/4 Flaminko from the two backbones (fresh resampler and gated cross-attention)")
    model, processor = FlaminkoForConditionalGeneration.from_backbones(vision, language)
    embedding = model.get_input_embeddings().weight
    new_rows = 2 * embedding.shape[1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and p is not embedding) + new_rows
    total = sum(p.numel() for p in model.parameters())
    print(f"    parameters: {total:,} total, {trainable:,} trainable (resampler, cross-attention, 2 new token rows)")

    folder = out / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    print(f"3/4 saved as safetensors with remote code -> {folder}; reloading through the Auto classes")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)

    print("4/4 few-shot captioning, greedy and beam search (untrained model: the words are noise)")
    prompt = "<image>Output:빨간색 원<|endofchunk|><image>Output:"
    images = [shape_image("빨간색"), shape_image("파란색")]
    batch = processor(text=prompt, images=images)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("    greedy (streamed): ", end="", flush=True)
    model.generate(**batch, max_new_tokens=12, do_sample=False, streamer=streamer)
    beams = model.generate(**batch, max_new_tokens=12, num_beams=3)
    captions = processor.batch_decode(beams[:, batch["input_ids"].shape[1] :])
    print(f"    beam search: {captions[0]!r}")
    return captions
