"""`flaminko demo`: a small Korean captioner trained end to end, offline.

Synthetic images of coloured shapes (varied backgrounds, shades, sizes and positions) with Korean
captions such as "빨간색 원"; one shape per colour is held out of training. The recipe is
Flamingo's, in miniature: an LM (with a tokenizer trained on the captions) is pretrained on text
holding every colour-shape phrase, and a vision tower on naming colours and shapes (standing in for
GPT-NeoX and CLIP, which cannot be downloaded here); both are frozen, and the resampler and gated
cross-attention of a small Flaminko are trained with the Trainer on interleaved documents of
captioned images, laid out as few-shot prompts are; some images come twice, the second time after
another colour word that carries no loss, so that the shape is named from the image whatever colour
word precedes it. The model is saved, reloaded through
AutoModelForImageTextToText / AutoProcessor, and asked to caption new images, the held-out
combinations among them. Prints the exact-match accuracy and writes a contact sheet.
"""

import csv
import json
import math
import random
import shutil
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from . import tiny
from .data import NO_LOSS_END, NO_LOSS_START
from .inference import generate_captions
from .processing_flaminko import END_OF_CHUNK_TOKEN
from .training import DataArguments, ModelArguments, internal_file_bars_off, train

COLOURS = {
    "빨간색": (215, 40, 40),
    "주황색": (240, 140, 20),
    "노란색": (240, 215, 30),
    "초록색": (40, 160, 60),
    "하늘색": (110, 200, 240),
    "파란색": (40, 70, 210),
    "보라색": (140, 60, 180),
    "분홍색": (245, 130, 200),
}
SHAPES = ("원", "네모", "세모", "마름모")
# One shape per colour, each shape twice: every colour and every shape is still seen in training,
# only not together.
HELD_OUT = {(colour, SHAPES[(index + 2) % len(SHAPES)]) for index, colour in enumerate(COLOURS)}
IMAGE_SIZE = 32
DEMO_STEPS = 1500  # Flaminko training steps
# The vision tower's pretraining steps per Flaminko step: a third as costly, and its shape features
# are what most misnamed unseen images lacked (diamonds read as circles).
VISION_STEPS_PER_STEP = 2
LANGUAGE_STEPS = 300  # the LM's pretraining on text
PHRASES_PER_TEXT = 8
# A text repeats 1 to this many phrases. Read in random order alone, every colour word was as likely as
# any other wherever one came, and the LM's output vectors for the colours (and the shapes) stayed
# almost alike: the cross-attention could not lift the right colour's odds past about 2 to 1, and which
# held-out pair came out wrong changed with the CPU. A real LM has read words recur, and tells each apart.
DISTINCT_PHRASES_PER_TEXT = 3
# Training documents hold up to this many image-caption pairs: as many as an 8-shot prompt's images.
MAX_DOCUMENT_IMAGES = 9
DOCUMENTS_PER_BATCH = 8  # 5 images a document on average: about as many captions a step as 32 pairs
SHADE_JITTER = 20
# This share of the training images enters the documents a second time, captioned with another
# colour word in no-loss tags and its own shape. Seen combinations alone teach the cross-attention
# that a shape never follows the colour it was held out for; these captions put every shape after
# every colour word, the shape still to be read from the image.
SWAPPED_COLOUR_SHARE = 0.25
# This share of the training images enters the documents a second time in greyscale, captioned with a
# random colour word in no-loss tags and its own shape: shapes named with no colour to read.
GREY_SHARE = 0.25
# As many images as this share of the training images are flat fields of one colour (its shade
# jittered), captioned with that colour word and a shape word in no-loss tags. Seen combinations alone
# teach the cross-attention which colours each shape comes in, and it named one of those for a held-out
# pair (pink squares read as yellow, red, purple, sky-blue or blue squares); with no shape to read,
# these name a colour from the colour alone, as the greyscale rows name a shape from the shape alone.
FLAT_COLOUR_SHARE = 0.25
OUTLINE = (20, 20, 20)
# Both pretrained backbones are frozen, as in Flamingo. A frozen LM keeps what its text taught it:
# any shape may follow a colour word. Trained along with the captions, it learned that the shape held
# out for a colour never does, and named a seen shape for most held-out images (docs/demo.md).
# A small resampler and cross-attention.
DEMO_CONFIG = {
    "freeze_vision_model": True,
    "freeze_language_model": True,
    "perceiver_depth": 1,
    "perceiver_num_latents": 16,
    "perceiver_heads": 4,
    "perceiver_dim_head": 16,
    "cross_attn_heads": 4,
    "cross_attn_dim_head": 32,
}


def shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """A random shade of one of COLOURS: each channel moved by up to SHADE_JITTER."""
    return tuple(min(255, max(0, value + rng.randint(-SHADE_JITTER, SHADE_JITTER))) for value in COLOURS[colour])


def draw(colour: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A shape in a random shade of one colour, outlined, on a random light-grey-ish background, at a
    random place and size."""
    background = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    radius = rng.uniform(0.3, 0.38) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    fill = shade(colour, rng)
    style = {"fill": fill, "outline": OUTLINE, "width": 2}
    canvas = ImageDraw.Draw(image)
    if shape == "원":
        canvas.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), **style)
    elif shape == "네모":
        canvas.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), **style)
    elif shape == "세모":
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], **style)
    else:
        canvas.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], **style)
    return image


def write_dataset(folder: Path, seed: int, train_per_combination: int = 300, test_per_combination: int = 10):
    """train.tsv (the seen combinations) and two test tables of new images: test_seen.tsv (seen
    combinations) and test_unseen.tsv (the held-out combinations), with their PNGs."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train.tsv": [], "test_seen.tsv": [], "test_unseen.tsv": []}
    for colour in COLOURS:
        for shape in SHAPES:
            unseen = (colour, shape) in HELD_OUT
            plan = [("test_unseen.tsv", 2 * test_per_combination)] if unseen else [
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
        write_table(folder / split, rows)
    return splits


def write_table(path: Path, rows: list[dict]):
    """A caption table as `flaminko train` and `flaminko eval` read it: image and caption, tab-separated."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["image", "caption"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def write_vision_pretraining_images(folder: Path, seed: int, per_combination: int = 300) -> list[dict]:
    """vision.tsv: images of every combination, the held-out ones too, for the vision tower's
    pretraining only, drawn from a stream of their own (the captioner's data stays as it is): a real
    Flamingo's frozen CLIP has seen every colour on every shape, though never named as a pair."""
    rng = random.Random(f"vision-{seed}")
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for index in range(per_combination):
                name = f"images/vision-{colour}-{shape}-{index}.png"
                draw(colour, shape, rng).save(folder / name)
                rows.append({"image": name, "caption": f"{colour} {shape}"})
    write_table(folder / "vision.tsv", rows)
    return rows


def swapped_colour_rows(rows: list[dict], seed: int) -> list[dict]:
    """A share SWAPPED_COLOUR_SHARE of the rows again, each captioned with a colour word other than its
    image's, in no-loss tags, and the shape its image shows."""
    rng = random.Random(seed)
    swapped = []
    for row in rng.sample(rows, round(SWAPPED_COLOUR_SHARE * len(rows))):
        colour, shape = row["caption"].split(" ")
        other = rng.choice([name for name in COLOURS if name != colour])
        swapped.append({"image": row["image"], "caption": f"{NO_LOSS_START}{other}{NO_LOSS_END} {shape}"})
    return swapped


def grey_rows(folder: Path, rows: list[dict], seed: int) -> list[dict]:
    """A share GREY_SHARE of the rows again, each image in greyscale (written beside it) and captioned
    with a random colour word in no-loss tags and the shape its image shows."""
    rng = random.Random(f"grey-{seed}")
    grey = []
    for row in rng.sample(rows, round(GREY_SHARE * len(rows))):
        shape = row["caption"].split(" ")[1]
        name = row["image"].replace(".png", "-grey.png")
        Image.open(folder / row["image"]).convert("L").convert("RGB").save(folder / name)
        grey.append({"image": name, "caption": f"{NO_LOSS_START}{rng.choice(list(COLOURS))}{NO_LOSS_END} {shape}"})
    return grey


def flat_colour_rows(folder: Path, count: int, seed: int) -> list[dict]:
    """`count` images of one colour all over, in a random shade of a random colour, each captioned with
    its colour word and a random shape word in no-loss tags; their PNGs are written to folder/images."""
    rng = random.Random(f"flat-{seed}")
    rows = []
    for index in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        fill = shade(colour, rng)
        name = f"images/flat-{colour}-{index}.png"
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), fill).save(folder / name)
        rows.append({"image": name, "caption": f"{colour} {NO_LOSS_START}{shape}{NO_LOSS_END}"})
    return rows


def write_documents(folder: Path, rows: list[dict], seed: int) -> Path:
    """train_documents.jsonl: the training images and captions again, grouped into interleaved
    documents of 1 to MAX_DOCUMENT_IMAGES image-caption pairs ("<image>caption<|endofchunk|>" each,
    as a few-shot prompt is laid out): each image once with its caption, and the swapped-colour
    (swapped_colour_rows), greyscale (grey_rows) and flat-colour rows (flat_colour_rows) among them."""
    flat = flat_colour_rows(folder, round(FLAT_COLOUR_SHARE * len(rows)), seed)
    rng = random.Random(seed)
    rows = rows + swapped_colour_rows(rows, seed) + grey_rows(folder, rows, seed) + flat
    rng.shuffle(rows)
    path = folder / "train_documents.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        while rows:
            size = rng.randint(1, MAX_DOCUMENT_IMAGES)
            pairs, rows = rows[:size], rows[size:]
            texts = [value for row in pairs for value in (None, row["caption"])]
            images = [value for row in pairs for value in (row["image"], None)]
            handle.write(json.dumps({"texts": texts, "images": images}, ensure_ascii=False) + "\n")
    return path


def save_backbones(folder: Path, captions: list[str]):
    """A small CLIP vision tower and GPT-NeoX LM from configs, with a tokenizer trained on the captions."""
    vision = folder / "vision"
    language = folder / "language-model"
    tiny.save_tiny_vision(vision, image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, num_hidden_layers=2)
    tiny.save_tiny_language_model(language, "gpt_neox", texts=captions * 4, hidden_size=64, num_hidden_layers=2)
    return vision, language


def language_texts(count: int, seed: int) -> list[str]:
    """`count` texts of PHRASES_PER_TEXT colour-shape phrases, each closed by <|endofchunk|> (as
    captions are in Flaminko's documents, so the frozen LM knows where one ends): each text repeats 1
    to DISTINCT_PHRASES_PER_TEXT phrases drawn from all of them, the held-out ones too, in random order."""
    phrases = [f"{colour} {shape}{END_OF_CHUNK_TOKEN}" for colour in COLOURS for shape in SHAPES]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        recurring = rng.sample(phrases, rng.randint(1, DISTINCT_PHRASES_PER_TEXT))
        texts.append("".join(rng.choices(recurring, k=PHRASES_PER_TEXT)))
    return texts


def pretrain_language_model(language: Path, out: Path, steps: int, seed: int):
    """Trains the LM in `language` (and its tokenizer) on text alone (language_texts), every
    colour-shape phrase equally often (the held-out ones too), and saves it back: a real Flamingo's
    frozen LM has read every phrase of its language before it sees an image, so no shape is unlikely
    after a colour word."""
    tokenizer = AutoTokenizer.from_pretrained(language)
    tokenizer.add_tokens([END_OF_CHUNK_TOKEN], special_tokens=True)
    tokenizer.save_pretrained(language)
    args = training_arguments(out, steps, seed)
    args.remove_unused_columns = False  # the samples are plain strings, turned into tensors by collate
    texts = language_texts(steps * args.per_device_train_batch_size, seed)
    # Padding for these batches only (their labels skip it); the saved tokenizer keeps none, and
    # Flaminko's processor adds its own.
    tokenizer.pad_token = tokenizer.eos_token

    def collate(batch: list[str]) -> dict:
        encoded = tokenizer(batch, padding=True, return_tensors="pt")
        encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return encoded

    model = AutoModelForCausalLM.from_pretrained(language)
    model.resize_token_embeddings(len(tokenizer))
    Trainer(model=model, args=args, train_dataset=texts, data_collator=collate).train()
    model.save_pretrained(language)


class AttributeClassifier(torch.nn.Module):
    """The vision tower's pretraining task: two linear heads on its mean output feature, one naming
    the colour and one the shape. Images come in colour and in greyscale; a greyscale copy has no
    colour label (-100), so the shape head learns features that do not depend on the colour, which
    is what lets the captioner name a shape in a colour it never saw it in."""

    def __init__(self, vision: CLIPVisionModel):
        super().__init__()
        self.vision = vision
        self.colour_head = torch.nn.Linear(vision.config.hidden_size, len(COLOURS))
        self.shape_head = torch.nn.Linear(vision.config.hidden_size, len(SHAPES))

    def forward(self, pixel_values, colour_labels, shape_labels):
        features = self.vision(pixel_values=pixel_values).last_hidden_state.mean(1)
        # Summed and divided by hand: a batch of greyscale copies only has no colour label at all.
        colour_loss = F.cross_entropy(self.colour_head(features), colour_labels, reduction="sum")
        colour_loss = colour_loss / colour_labels.ne(-100).sum().clamp(min=1)
        return {"loss": colour_loss + F.cross_entropy(self.shape_head(features), shape_labels)}


def attribute_samples(rows: list[dict], folder: Path, image_processor) -> list[dict]:
    """Each training image twice, in colour with both labels and in greyscale with the shape only."""
    images = [Image.open(folder / row["image"]).convert("RGB") for row in rows]
    greys = [image.convert("L").convert("RGB") for image in images]
    samples = []
    for batch, with_colour in ((images, True), (greys, False)):
        pixel_values = image_processor(images=batch, return_tensors="pt")["pixel_values"]
        for pixels, row in zip(pixel_values, rows):
            colour, shape = row["caption"].split(" ")
            samples.append(
                {
                    "pixel_values": pixels,
                    "colour_labels": list(COLOURS).index(colour) if with_colour else -100,
                    "shape_labels": SHAPES.index(shape),
                }
            )
    return samples


def training_arguments(output_dir: Path, steps: int, seed: int, batch_size: int = 32) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
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


def pretrain_vision(vision: Path, rows: list[dict], data_folder: Path, out: Path, steps: int, seed: int):
    """Trains the vision tower in `vision` on colour and shape names with the Trainer, and saves it back."""
    classifier = AttributeClassifier(CLIPVisionModel.from_pretrained(vision))
    samples = attribute_samples(rows, data_folder, AutoImageProcessor.from_pretrained(vision))
    Trainer(model=classifier, args=training_arguments(out, steps, seed), train_dataset=samples).train()
    classifier.vision.save_pretrained(vision)


def korean_font(size: int):
    path = resources.files("flaminko").joinpath("resources/NanumGothic-demo.ttf")
    return ImageFont.truetype(str(path), size)


def contact_sheet(images, captions, truths, labels, path: Path, columns: int = 5):
    """Each image with its generated caption (green when right, red when wrong) and a grey label
    saying which test set it comes from."""
    cell_width, cell_height, scale = 150, 150, 2
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    canvas = ImageDraw.Draw(sheet)
    font, small_font = korean_font(18), korean_font(11)
    for index, (image, caption, truth, label) in enumerate(zip(images, captions, truths, labels)):
        x, y = (index % columns) * cell_width, (index // columns) * cell_height
        sheet.paste(image.resize((IMAGE_SIZE * scale, IMAGE_SIZE * scale)), (x + (cell_width - IMAGE_SIZE * scale) // 2, y + 8))
        colour = (20, 140, 40) if caption == truth else (200, 30, 30)
        canvas.text((x + cell_width // 2, y + IMAGE_SIZE * scale + 26), caption or "(empty)", fill=colour, font=font, anchor="mm")
        canvas.text((x + cell_width // 2, y + IMAGE_SIZE * scale + 48), label, fill=(120, 120, 120), font=small_font, anchor="mm")
    sheet.save(path)


@internal_file_bars_off()
def run_demo(out: str = "flaminko-demo", steps: int = DEMO_STEPS, seed: int = 0) -> dict:
    """Pretrain a vision tower, train, save, reload, caption new images; returns the results."""
    started = time.perf_counter()
    set_seed(seed)  # the backbones are initialised before the Trainer seeds anything
    out = Path(out)
    print(f"1/7 synthetic data: {len(COLOURS)} colours x {len(SHAPES)} shapes, {len(HELD_OUT)} combinations held out")
    splits = write_dataset(out / "data", seed)
    documents = write_documents(out / "data", splits["train.tsv"], seed)
    print("2/7 tokenizer trained on the captions; small CLIP vision tower and GPT-NeoX LM from configs")
    vision, language = save_backbones(out / "backbones", [row["caption"] for row in splits["train.tsv"]])
    print(f"3/7 pretraining the LM on text: every colour-shape phrase, a few recurring in each text, {LANGUAGE_STEPS} steps")
    pretrain_language_model(language, out / "language-pretraining", LANGUAGE_STEPS, seed)
    vision_steps = VISION_STEPS_PER_STEP * steps
    print(f"4/7 pretraining the vision tower to name colours and shapes, {vision_steps} steps")
    vision_rows = write_vision_pretraining_images(out / "data", seed)
    pretrain_vision(vision, vision_rows, out / "data", out / "vision-pretraining", vision_steps, seed)
    print(
        f"5/7 fine-tuning Flaminko's resampler and cross-attention (LM and vision tower frozen) with the Trainer "
        f"on interleaved documents of 1-{MAX_DOCUMENT_IMAGES} captioned images and, with one word of each caption "
        f"carrying no loss, {SWAPPED_COLOUR_SHARE:.0%} of them again after another colour word, {GREY_SHARE:.0%} again in "
        f"greyscale and {FLAT_COLOUR_SHARE:.0%} as many flat fields of one colour, {steps} steps"
    )
    model_args = ModelArguments(
        vision_model=str(vision), language_model=str(language), config_overrides=json.dumps(DEMO_CONFIG)
    )
    data_args = DataArguments(train_data=str(documents), data_format="interleaved", max_images=MAX_DOCUMENT_IMAGES)
    flaminko_args = training_arguments(out / "run", steps, seed, DOCUMENTS_PER_BATCH)
    flaminko_args.weight_decay = 0.1
    # The next batch's images are read and processed in a second process while this one trains: the
    # same batches, so the same weights, about a tenth sooner on 2 cores.
    flaminko_args.dataloader_num_workers = 1
    flaminko_args.dataloader_persistent_workers = True
    _, final = train(model_args, data_args, flaminko_args)
    print(f"6/7 saved to {final}; reloading through AutoModelForImageTextToText and AutoProcessor")
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    accuracies, sheets = {}, []
    for split in ("test_seen.tsv", "test_unseen.tsv"):
        rows = splits[split]
        images = [Image.open(out / "data" / row["image"]).convert("RGB") for row in rows]
        truths = [row["caption"] for row in rows]
        captions = generate_captions(model, processor, images, max_new_tokens=8, num_beams=1)
        accuracies[split] = sum(c == t for c, t in zip(captions, truths)) / len(truths)
        label = "seen pair" if split == "test_seen.tsv" else "unseen pair"
        sheets.append((images[:15], captions[:15], truths[:15], [label] * 15))
    sheet = out / "contact_sheet.png"
    contact_sheet(*(sum(parts, []) for parts in zip(*sheets)), sheet)
    seconds = time.perf_counter() - started
    print(
        f"7/7 held-out images, exact match: {accuracies['test_seen.tsv']:.1%} for combinations seen in training "
        f"({len(splits['test_seen.tsv'])} new images), {accuracies['test_unseen.tsv']:.1%} for the combinations "
        f"never seen ({len(splits['test_unseen.tsv'])} images)"
    )
    print(f"contact sheet: {sheet}; total time {seconds:.0f} s")
    # The folder records the prompt format it learned ("<image>caption"), so chat captions an image
    # sent alone instead of answering "User: ... Assistant:" turns it never saw.
    print(f"next: flaminko caption --model {final} {out / 'data' / 'images'}/test_unseen-*.png")
    print(f"      flaminko chat --model {final}   (then '/image PATH' and Enter)")
    counts = {split: len(splits[split]) for split in accuracies}
    results = {
        "accuracy_all_test_images": sum(accuracies[split] * counts[split] for split in counts) / sum(counts.values()),
        "accuracy_seen_combinations": accuracies["test_seen.tsv"],
        "accuracy_unseen_combinations": accuracies["test_unseen.tsv"],
        "seconds": seconds,
        "steps": steps,
        "seed": seed,
        # The order of the float sums, and so the weights, changes with the thread count (OMP_NUM_THREADS).
        "threads": torch.get_num_threads(),
    }
    results.update(report_through_harness(model, processor, out))
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2))
    return results


def report_through_harness(model, processor, out: Path) -> dict:
    """The held-out accuracy and CIDEr as `flaminko eval` measures them (0-shot, the bare `<image>`
    prompt the demo trains with, greedy); its results.json and predictions land in out/eval/."""
    from .evaluation import evaluate

    reported = {}
    for split in ("test_seen", "test_unseen"):
        # Predictions of an earlier demo in this folder came from another model: flaminko eval would refuse them.
        shutil.rmtree(out / "eval" / split, ignore_errors=True)
        try:
            report = evaluate(
                (model, processor), task="captioning", data=out / "data" / f"{split}.tsv", prompt_format="plain",
                num_beams=1, max_new_tokens=8, batch_size=16, output_dir=out / "eval" / split, progress=False,
            )  # fmt: skip
        except ImportError as error:
            print(f"flaminko eval skipped: {error}")
            return {}
        metrics = report["metrics"]["0"]
        reported[f"eval_{split}"] = {name: metrics[name]["mean"] for name in ("exact match", "CIDEr")}
        print(
            f"flaminko eval, {split}: exact match {metrics['exact match']['mean']:.1f}%, "
            f"CIDEr {metrics['CIDEr']['mean']:.1f} ({metrics['tokenizer']} tokenizer; 500 is every caption right)"
        )
    return reported
