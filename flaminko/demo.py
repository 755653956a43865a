"""`flaminko demo`: a small Korean captioner trained end to end, offline.

Synthetic images of coloured shapes (varied backgrounds, sizes and positions) with Korean captions
such as "빨간색 원"; some colour-shape combinations never appear in training. A tokenizer is trained
on the captions, a small Flaminko is built from configs and fine-tuned with the Trainer, saved,
reloaded through AutoModelForImageTextToText / AutoProcessor, and asked to caption the held-out
combinations. Prints the exact-match accuracy and writes a contact sheet.
"""

import csv
import json
import math
import random
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments, set_seed

from . import tiny
from .training import DataArguments, ModelArguments, train

COLOURS = {
    "빨간색": (215, 40, 40),
    "파란색": (40, 80, 220),
    "초록색": (30, 160, 60),
    "노란색": (235, 200, 20),
    "보라색": (140, 50, 170),
}
SHAPES = ("원", "네모", "세모", "마름모")
# Each colour and each shape is still seen in training, only not together.
HELD_OUT = {("빨간색", "세모"), ("파란색", "마름모"), ("초록색", "원"), ("노란색", "네모"), ("보라색", "세모")}
IMAGE_SIZE = 32
# Backbones trained from scratch here, so nothing is frozen; a small resampler and cross-attention.
DEMO_CONFIG = {
    "freeze_vision_model": False,
    "freeze_language_model": False,
    "perceiver_depth": 1,
    "perceiver_num_latents": 16,
    "perceiver_heads": 4,
    "perceiver_dim_head": 16,
    "cross_attn_heads": 4,
    "cross_attn_dim_head": 32,
}


def draw(colour: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A shape of one colour on a random light-grey-ish background, at a random place and size."""
    background = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    radius = rng.uniform(0.3, 0.38) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    fill = COLOURS[colour]
    canvas = ImageDraw.Draw(image)
    if shape == "원":
        canvas.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "네모":
        canvas.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "세모":
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        canvas.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    return image


def write_dataset(folder: Path, seed: int, train_per_combination: int = 100, test_per_combination: int = 5):
    """train.tsv (the seen combinations) and two test tables of new images: test_seen.tsv (seen
    combinations) and test_unseen.tsv (the held-out combinations), with their PNGs."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train.tsv": [], "test_seen.tsv": [], "test_unseen.tsv": []}
    for colour in COLOURS:
        for shape in SHAPES:
            unseen = (colour, shape) in HELD_OUT
            plan = [("test_unseen.tsv", test_per_combination)] if unseen else [
                ("train.tsv", train_per_combination),
                ("test_seen.tsv", test_per_combination),
            ]
            for split, count in plan:
                for index in range(count):
                    name = f"images/{split.split('.')[0]}-{colour}-{shape}-{index}.png"
                    draw(colour, shape, rng).save(folder / name)
                    splits[split].append({"image": name, "caption": f"{colour} {shape}"})
    for split, rows in splits.items():
        rng.shuffle(rows)
        with open(folder / split, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["image", "caption"], delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
    return splits


def save_backbones(folder: Path, captions: list[str]):
    """A small CLIP vision tower and GPT-NeoX LM from configs, with a tokenizer trained on the captions."""
    vision = folder / "vision"
    language = folder / "language-model"
    tiny.save_tiny_vision(vision, image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, num_hidden_layers=2)
    tiny.save_tiny_language_model(language, "gpt_neox", texts=captions * 4, hidden_size=64, num_hidden_layers=2)
    return vision, language


def caption_images(model, processor, images, batch_size: int = 16) -> list[str]:
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = processor(text=["<image>"] * len(chunk), images=[[image] for image in chunk])
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        captions += [c.strip() for c in processor.batch_decode(out[:, batch["input_ids"].shape[1] :])]
    return captions


def korean_font(size: int):
    path = resources.files("flaminko").joinpath("resources/NanumGothic-demo.ttf")
    return ImageFont.truetype(str(path), size)


def contact_sheet(images, captions, truths, path: Path, columns: int = 5):
    """Each image with its generated caption (green when right, red when wrong)."""
    cell_width, cell_height, scale = 150, 150, 2
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    canvas = ImageDraw.Draw(sheet)
    font = korean_font(18)
    for index, (image, caption, truth) in enumerate(zip(images, captions, truths)):
        x, y = (index % columns) * cell_width, (index // columns) * cell_height
        sheet.paste(image.resize((IMAGE_SIZE * scale, IMAGE_SIZE * scale)), (x + (cell_width - IMAGE_SIZE * scale) // 2, y + 8))
        colour = (20, 140, 40) if caption == truth else (200, 30, 30)
        canvas.text((x + cell_width // 2, y + IMAGE_SIZE * scale + 26), caption or "∅", fill=colour, font=font, anchor="mm")
    sheet.save(path)


def run_demo(out: str = "flaminko-demo", steps: int = 2500, seed: int = 0) -> dict:
    """Train, save, reload, caption the held-out combinations; returns the results."""
    started = time.perf_counter()
    set_seed(seed)  # the backbones are initialised before the Trainer seeds anything
    out = Path(out)
    print(f"1/5 synthetic data: {len(COLOURS)} colours x {len(SHAPES)} shapes, {len(HELD_OUT)} combinations held out")
    splits = write_dataset(out / "data", seed)
    print("2/5 tokenizer trained on the captions; small CLIP vision tower and GPT-NeoX LM from configs")
    vision, language = save_backbones(out / "backbones", [row["caption"] for row in splits["train.tsv"]])
    print(f"3/5 fine-tuning with the Trainer for {steps} steps")
    args = TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 20,
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    model_args = ModelArguments(
        vision_model=str(vision), language_model=str(language), config_overrides=json.dumps(DEMO_CONFIG)
    )
    trainer, final = train(model_args, DataArguments(train_data=str(out / "data" / "train.tsv")), args)
    print(f"4/5 saved to {final}; reloading through AutoModelForImageTextToText and AutoProcessor")
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    accuracies, sheets = {}, []
    for split in ("test_seen.tsv", "test_unseen.tsv"):
        rows = splits[split]
        images = [Image.open(out / "data" / row["image"]).convert("RGB") for row in rows]
        truths = [row["caption"] for row in rows]
        captions = caption_images(model, processor, images)
        accuracies[split] = sum(c == t for c, t in zip(captions, truths)) / len(truths)
        sheets.append((images[:15], captions[:15], truths[:15]))
    sheet = out / "contact_sheet.png"
    contact_sheet(*(sum(parts, []) for parts in zip(*sheets)), sheet)
    seconds = time.perf_counter() - started
    print(
        f"5/5 held-out images, exact match: {accuracies['test_seen.tsv']:.1%} for combinations seen in training "
        f"({len(splits['test_seen.tsv'])} new images), {accuracies['test_unseen.tsv']:.1%} for the combinations "
        f"never seen ({len(splits['test_unseen.tsv'])} images)"
    )
    print(f"contact sheet: {sheet}; total time {seconds:.0f} s")
    results = {
        "accuracy_seen_combinations": accuracies["test_seen.tsv"],
        "accuracy_unseen_combinations": accuracies["test_unseen.tsv"],
        "seconds": seconds,
        "steps": steps,
        "seed": seed,
    }
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2))
    return results
