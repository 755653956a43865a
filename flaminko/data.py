"""Training data for Flaminko: caption tables, webdataset shards and interleaved documents.

Every source yields samples {"text": ..., "images": [...], **extra columns}: the text carries an
`<image>` placeholder per image and `<|endofchunk|>` after the text of each image, as OpenFlamingo
builds them; FlaminkoCollator turns a list of samples into model inputs with labels. Text between
`<no_loss>` and `</no_loss>` is read without the tags and carries no loss. Bad rows (empty caption,
unreadable image, filtered caption, unbalanced tags) are skipped and counted, never raised mid-epoch.
"""

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from .processing_flaminko import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, load_image

HANGUL = re.compile("[\uac00-\ud7a3]")
# OpenFlaminKO's filter: captions of this many characters or more are dropped.
MAX_CAPTION_CHARS = 1000
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# Text between these tags is read by the LM, without the tags, but carries no loss: words a text
# needs for its form that the image does not show, or a prompt the model should read, not learn.
NO_LOSS_START, NO_LOSS_END = "<no_loss>", "</no_loss>"
NO_LOSS_TAG = re.compile(f"({re.escape(NO_LOSS_START)}|{re.escape(NO_LOSS_END)})")


def split_no_loss(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without its no-loss tags, and the character spans of it that they enclosed.
    Raises ValueError on tags that do not pair up (nested, unopened or unclosed)."""
    clean, spans, start = "", [], None
    for piece in NO_LOSS_TAG.split(text):
        if piece == NO_LOSS_START and start is None:
            start = len(clean)
        elif piece == NO_LOSS_END and start is not None:
            spans.append((start, len(clean)))
            start = None
        elif piece in (NO_LOSS_START, NO_LOSS_END):
            raise ValueError(f"{piece} out of place in {text!r}: {NO_LOSS_START} and {NO_LOSS_END} pair up, unnested")
        else:
            clean += piece
    if start is not None:
        raise ValueError(f"{NO_LOSS_START} without its {NO_LOSS_END} in {text!r}")
    return clean, spans


def no_loss_problem(text: str) -> str | None:
    try:
        split_no_loss(text)
    except ValueError:
        return f"unbalanced {NO_LOSS_START} tags"
    return None


def pair_text(caption: str) -> str:
    """OpenFlamingo's image-caption text (the collator appends the EOS token)."""
    return f"{IMAGE_TOKEN}{caption.strip()}{END_OF_CHUNK_TOKEN}"


# The text `flaminko train` teaches (pair_text: "<image>caption<|endofchunk|>") as a chat
# template: a user turn is its images and text, the answer continues it and ends with
# <|endofchunk|>. Training saves it with the processor (chat_template.jinja), so that chat prompts
# a trained model the way it was trained; DEFAULT_CHAT_TEMPLATE's "User:/Assistant:" turns are for
# models that learned them.
CAPTION_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    f"{{%- if part['type'] == 'image' -%}}{IMAGE_TOKEN}{{%- elif part['type'] == 'text' -%}}{{{{ part['text'] }}}}{{%- endif -%}}"
    "{%- endfor -%}{%- endif -%}"
    f"{{%- if message['role'] == 'assistant' -%}}{END_OF_CHUNK_TOKEN}{{%- endif -%}}"
    "{%- endfor -%}"
)


def caption_problem(caption, *, hangul_only: bool = False) -> str | None:
    """Why a caption is skipped, or None to keep it."""
    if not isinstance(caption, str) or not caption.strip():
        return "empty caption"
    if len(caption) >= MAX_CAPTION_CHARS:
        return f"caption of {MAX_CAPTION_CHARS}+ characters"
    if hangul_only and not HANGUL.search(caption):
        return "caption without Hangul"
    return no_loss_problem(caption)


def image_problem(source) -> str | None:
    """Why an image (a path, or a binary file object such as a dataset cell's bytes) is skipped, checked
    without decoding all of it, or None."""
    try:
        with Image.open(source) as image:
            image.verify()
    except FileNotFoundError:
        return "missing image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "unreadable image"
    return None


class Skipped(Counter):
    """Rows left out, counted by reason; `note` also keeps the first rows of each reason, so that the
    report can name them (sources with row numbers: Hugging Face datasets)."""

    SHOWN = 3

    def __init__(self):
        super().__init__()
        self.rows = {}

    def note(self, reason: str, row: int):
        self[reason] += 1
        shown = self.rows.setdefault(reason, [])
        if len(shown) < self.SHOWN:
            shown.append(row)

    def __str__(self):
        parts = []
        for reason, count in self.items():
            rows = self.rows.get(reason)
            named = f" ({'row' if count == 1 else 'rows'} {', '.join(map(str, rows))}{', ...' if count > len(rows) else ''})" if rows else ""
            parts.append(f"{count} {reason}{named}")
        return ", ".join(parts)


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file; a missing file or a broken line is named."""
    if not path.is_file():
        raise ValueError(f"Data file not found: {str(path)!r} does not exist or is not a file")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{str(path)!r} line {number} is not JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{str(path)!r} line {number} is not a JSON object")
            records.append(record)
    return records


def read_table(path: Path) -> list[dict]:
    """Rows of a .tsv, .csv or .jsonl file."""
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix not in (".tsv", ".csv"):
        raise ValueError(f"Caption tables are .tsv, .csv or .jsonl files; got {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"Data file not found: {str(path)!r} does not exist or is not a file")
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))


class CaptionTable(Dataset):
    """Image-caption pairs from a TSV/CSV/JSONL table with `caption` and `image` columns.

    Image paths are relative to the table's folder; other columns (e.g. `item_url`) are kept in
    the samples. `skipped` counts the rows left out, by reason.
    """

    def __init__(self, path, *, caption_column="caption", image_column="image", hangul_only=False):
        path = Path(path)
        rows = read_table(path)
        if rows and (caption_column not in rows[0] or image_column not in rows[0]):
            raise ValueError(
                f"{str(path)!r} needs {caption_column!r} and {image_column!r} columns; it has {sorted(rows[0])}"
            )
        self.skipped = Skipped()
        self.samples = []
        for row in tqdm(rows, desc=f"checking {path.name}", unit="row", disable=len(rows) < 1000):
            image_path = path.parent / str(row.get(image_column) or "")
            problem = caption_problem(row.get(caption_column), hangul_only=hangul_only) or image_problem(image_path)
            if problem:
                self.skipped[problem] += 1
                continue
            extra = {k: v for k, v in row.items() if k not in (caption_column, image_column)}
            self.samples.append({**extra, "text": pair_text(row[caption_column]), "images": [str(image_path)]})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


class CaptionShards(IterableDataset):
    """Image-caption pairs streamed from webdataset tar shards (LAION / KO-LAION layout: a
    jpg/png/webp and a txt or json caption per key), split across nodes and workers."""

    def __init__(self, urls, *, hangul_only=False):
        try:
            import webdataset
        except ImportError as error:
            raise ImportError("Tar shards need webdataset: pip install 'flaminko[train]'") from error
        self.urls = urls
        self.hangul_only = hangul_only
        self.skipped = Skipped()
        self._webdataset = webdataset

    def __iter__(self):
        wds = self._webdataset
        shards = wds.WebDataset(
            self.urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False
        )
        for record in shards:
            sample = self._sample(record)
            if sample is not None:
                yield sample

    def _sample(self, record):
        caption = record.get("txt")
        if caption is None and "json" in record:
            caption = json.loads(record["json"]).get("caption")
        caption = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else caption
        problem = caption_problem(caption, hangul_only=self.hangul_only)
        image_bytes = next((record[s] for s in IMAGE_SUFFIXES if s in record), None)
        if problem is None and image_bytes is None:
            problem = "missing image file"
        if problem is None:
            try:
                image = load_image(Image.open(io.BytesIO(image_bytes)))
            except (OSError, ValueError, Image.DecompressionBombError):
                problem = "unreadable image"
        if problem:
            self.skipped[problem] += 1
            return None
        return {"text": pair_text(caption), "images": [image], "key": record.get("__key__")}


class InterleavedDocuments(Dataset):
    """Documents of text and images in order, from JSONL in MMC4 form (`text_list` + `image_info`
    with `matched_text_index`) or OBELICS form (`texts` and `images`, aligned lists with nulls).

    As OpenFlamingo builds them: each sentence with an image is prefixed `<|endofchunk|><image>`
    (the first `<|endofchunk|>` dropped) and the document ends with `<|endofchunk|>`; at most
    max_images images.
    """

    def __init__(self, path, *, max_images=6):
        path = Path(path)
        self.skipped = Skipped()
        self.samples = []
        for document in read_jsonl(path):
            sample = self._build(document, path.parent, max_images)
            if sample is not None:
                self.samples.append(sample)

    def _build(self, document, root, max_images):
        if "text_list" in document:
            items = self._mmc4_items(document)
        elif "texts" in document and "images" in document:
            items = [("image", image) if image else ("text", text) for text, image in zip(document["texts"], document["images"])]
        else:
            self.skipped["unknown document layout"] += 1
            return None
        sentences, images, prefix = [], [], ""
        for kind, value in items:
            if kind == "text":
                if value and value.strip():
                    sentences.append(prefix + value.strip())
                    prefix = ""
                continue
            if len(images) == max_images:
                continue
            image_path = root / value
            problem = image_problem(image_path)
            if problem:
                self.skipped[problem] += 1
                continue
            images.append(str(image_path))
            prefix += f"{END_OF_CHUNK_TOKEN}{IMAGE_TOKEN}"
        if prefix:
            sentences.append(prefix)
        if not images:
            self.skipped["document without readable images"] += 1
            return None
        text = " ".join(sentences).replace(END_OF_CHUNK_TOKEN, "", 1)
        for spaced, tight in ((f" {END_OF_CHUNK_TOKEN}", END_OF_CHUNK_TOKEN), (f"{IMAGE_TOKEN} ", IMAGE_TOKEN), (f" {IMAGE_TOKEN}", IMAGE_TOKEN)):
            text = text.replace(spaced, tight)
        problem = no_loss_problem(text)
        if problem:
            self.skipped[problem] += 1
            return None
        return {"text": text + END_OF_CHUNK_TOKEN, "images": images}

    @staticmethod
    def _mmc4_items(document):
        by_sentence = {}
        for info in document.get("image_info", []):
            by_sentence.setdefault(info["matched_text_index"], []).append(info["image_name"])
        items = []
        for index, sentence in enumerate(document["text_list"]):
            items += [("image", name) for name in by_sentence.get(index, [])]
            items.append(("text", sentence))
        return items

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def mask_interleaved_labels(labels: torch.Tensor, input_ids: torch.Tensor, media_token_id: int, eoc_token_id: int):
    """OpenFlamingo's interleaved loss mask, in place: no loss before a document's first <image>,
    nor after an <|endofchunk|> up to the next <image> (the <|endofchunk|> itself keeps its loss)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(positions, -1)
    last_media = torch.where(input_ids == media_token_id, positions, none).cummax(1).values
    last_eoc = torch.where(input_ids == eoc_token_id, positions, none).cummax(1).values
    previous_eoc = torch.cat([none[:, :1], last_eoc[:, :-1]], dim=1)
    labels[(last_media < 0) | (previous_eoc > last_media)] = -100


def mask_no_loss_spans(labels: torch.Tensor, offsets: torch.Tensor, spans: list[list[tuple[int, int]]]):
    """In place: -100 on each token whose characters (`offsets`, the tokenizer's offset mapping)
    overlap a no-loss span of its text; a token straddling the span's edge carries no loss either."""
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            labels[row, (offsets[row, :, 0] < end) & (offsets[row, :, 1] > start)] = -100


def replace_words_at_random(input_ids: torch.Tensor, words: torch.Tensor, probability: float) -> torch.Tensor:
    """Input ids where each word token (`words`: a mask) is, with the given probability, replaced by
    a word token drawn from the whole batch, so that the LM reads a random word in its place: word
    dropout with the batch's own words. Uses torch's global generator (the Trainer seeds it)."""
    candidates = input_ids[words]
    if candidates.numel() == 0:
        return input_ids
    replace = words & (torch.rand(input_ids.shape) < probability)
    noisy = input_ids.clone()
    noisy[replace] = candidates[torch.randint(candidates.numel(), (int(replace.sum()),))]
    return noisy


# The key under which a streamed sample carries the stream's position after its row
# (flaminko.hf_datasets.StreamedCaptions); the collator passes the last one on with the batch.
STREAM_STATE = "stream_state"


class FlaminkoCollator:
    """Pads a list of samples into model inputs, right-padded, with labels: -100 on padding, on
    <image> tokens and on text between <no_loss> tags (read without the tags; needs a fast
    tokenizer, for its offsets), and for interleaved documents OpenFlamingo's between-chunk mask too.

    `word_noise` > 0 replaces that share of the text tokens the LM reads (not <image>,
    <|endofchunk|>, EOS or padding) with random text tokens of the batch, the labels keeping the
    true ones: the LM cannot predict a word from the words before it alone, and leans on the image.

    The Trainer must pass the raw samples: use remove_unused_columns=False (the samples' `text`
    and `images` are not arguments of the model's forward). Streamed samples' positions come out as
    the batch's `stream_state`, which the trainer takes off before the forward.
    """

    def __init__(self, processor, *, max_length: int = 32, interleaved: bool = False, word_noise: float = 0.0):
        if not 0 <= word_noise <= 1:
            raise ValueError(f"word_noise is a probability, between 0 and 1; got {word_noise}")
        self.processor = processor
        self.max_length = max_length
        self.interleaved = interleaved
        self.word_noise = word_noise
        tokenizer = processor.tokenizer
        special = (processor.image_token_id, processor.end_of_chunk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
        self.not_words = torch.tensor([token for token in special if token is not None])
        self.skipped = Skipped()

    def __call__(self, samples):
        if samples and "text" not in samples[0]:
            raise ValueError(
                "The collator got samples without 'text': the Trainer removed the columns; "
                "set remove_unused_columns=False"
            )
        tokenizer = self.processor.tokenizer
        eos = tokenizer.eos_token or ""
        texts, images, no_loss = [], [], []
        for sample in samples:
            try:
                loaded = [load_image(image) for image in sample["images"]]
            except (ValueError, OSError):  # OSError: PIL's, from an image opened lazily (a dataset cell's bytes)
                self.skipped["unreadable image"] += 1
                continue
            text, spans = split_no_loss(sample["text"] + eos)
            texts.append(text)
            no_loss.append(spans)
            images.append(loaded)
        if not texts:
            raise ValueError(f"Every sample of this batch had an unreadable image ({len(samples)} samples)")
        with_spans = any(no_loss)
        if with_spans and not tokenizer.is_fast:
            raise ValueError(f"{NO_LOSS_START} tags need a fast tokenizer (its offsets); {type(tokenizer).__name__} is not")
        batch = self.processor(
            text=texts,
            images=images,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            drop_truncated_images=True,
            return_offsets_mapping=with_spans,
        )
        input_ids = batch["input_ids"]
        labels = input_ids.clone()
        if self.interleaved:
            mask_interleaved_labels(labels, input_ids, self.processor.image_token_id, self.processor.end_of_chunk_token_id)
        if with_spans:
            mask_no_loss_spans(labels, batch.pop("offset_mapping"), no_loss)
        labels[batch["attention_mask"] == 0] = -100
        labels[input_ids == self.processor.image_token_id] = -100
        batch["labels"] = labels
        if self.word_noise:
            words = batch["attention_mask"].bool() & ~torch.isin(input_ids, self.not_words)
            batch["input_ids"] = replace_words_at_random(input_ids, words, self.word_noise)
        if STREAM_STATE in samples[-1]:
            batch[STREAM_STATE] = samples[-1][STREAM_STATE]
        return batch
