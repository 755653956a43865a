"""Hugging Face `datasets` as data for `flaminko train` and `flaminko eval`: a Hub dataset id, a Parquet
file or a folder of them (a folder laid out as a Hub dataset repo, its README metadata included), or
a `Dataset.save_to_disk` folder, read by datasets' own code (load_dataset, load_from_disk). Streamed,
a dataset is read as it goes, each process its own part (split_dataset_by_node), and a resumed run
continues where its checkpoint stood (IterableDataset.state_dict / load_state_dict).

`datasets` is optional: it is imported only when one of these forms is used.
"""

import io
import json
import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from tqdm.auto import tqdm

from .data import STREAM_STATE, Skipped, caption_problem, image_problem, pair_text
from .hub import is_hub_id
from .processing_flaminko import decode_image_file, load_image

# A value ending so names a file, never a Hub dataset id: a missing captions.tsv is a missing file.
FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt", ".tar", ".parquet")
# What Dataset.save_to_disk and DatasetDict.save_to_disk write at the top of their folder.
SAVED_MARKERS = ("state.json", "dataset_dict.json")
# The option naming each column, and the names looked for when it is not given: the layouts of the
# image-text datasets on the Hub (COCO and Flickr captions, VQAv2, OK-VQA, TextVQA, VizWiz, Hateful Memes).
COLUMNS = {
    "image": ("--image_column", ("image", "img", "image_path", "file_name")),
    "text": ("--text_column", ("caption", "captions", "text", "sentences")),
    "question": ("--question_column", ("question",)),
    "answers": ("--answers_column", ("answers", "answer")),
    "label": ("--label_column", ("label", "class_name")),
}
# Where a streamed run's position is saved in each checkpoint, one file per process.
STREAM_STATE_FILE = "stream-state-rank{rank}.json"


def import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "Hugging Face datasets (Hub ids, Parquet, save_to_disk folders) need the datasets package: "
            "pip install datasets (it comes with pip install 'flaminko[train]')"
        ) from error
    return datasets


def is_datasets_source(value) -> bool:
    """True for what datasets reads: a Parquet file, a folder (of Parquet files, laid out as a Hub
    dataset repo, or written by save_to_disk) or a Hub dataset id; False for a file of another format."""
    value = str(value)
    if os.path.isdir(value) or value.endswith(".parquet"):
        return True
    return not value.lower().endswith(FILE_SUFFIXES) and is_hub_id(value)


def _is_saved(source: str) -> bool:
    return os.path.isdir(source) and any(os.path.isfile(os.path.join(source, name)) for name in SAVED_MARKERS)


def load_source(source, *, split: str, config: str | None = None, streaming: bool = False, option: str, split_option: str):
    """One split of the dataset `source` names: a datasets.Dataset, or streamed an IterableDataset.
    A single Parquet file is one split by itself; a save_to_disk folder of one Dataset too."""
    datasets = import_datasets()
    source = str(source)
    saved, parquet_file = _is_saved(source), source.endswith(".parquet")
    if config is not None and (saved or parquet_file):
        raise ValueError(f"--config {config}: {option} {source} is one dataset without configurations (--config names a Hub dataset's)")
    if parquet_file:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{option} {source}: no such file")
        return datasets.load_dataset("parquet", data_files=source, split="train", streaming=streaming)
    if saved:
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            _check_split(list(loaded), split, option, source, split_option)
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    # A folder of Parquet files (laid out as a Hub dataset repo or not) and a Hub id: the same call.
    _check_split(datasets.get_dataset_split_names(source, config_name=config), split, option, source, split_option)
    return datasets.load_dataset(source, name=config, split=split, streaming=streaming)


def _check_split(names: list, split: str, option: str, source: str, split_option: str):
    if split not in names:
        raise ValueError(f"{option} {source} has no split {split!r}; its splits: {', '.join(names)} (choose with {split_option})")


def column_names(dataset) -> list[str]:
    """The columns of a dataset; of a stream whose features are not declared, those of its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset), {}))


def find_column(columns: list[str], role: str, given: str | None, source) -> str:
    """The column read for `role`: the one given, or the first of the usual names that the dataset has."""
    option, usual = COLUMNS[role]
    if given is not None:
        if given not in columns:
            raise ValueError(f"{option} {given}: {source} has no such column; its columns: {', '.join(columns)}")
        return given
    found = next((name for name in usual if name in columns), None)
    if found is None:
        raise ValueError(
            f"{source} has no {role} column ({' / '.join(usual)}); its columns: {', '.join(columns)}: name one with {option}"
        )
    return found


def with_undecoded_images(dataset, column: str):
    """The dataset with `column`'s datasets.Image cells left as {bytes, path}: checked without decoding,
    decoded when a sample is used."""
    datasets = import_datasets()
    if isinstance((dataset.features or {}).get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def image_url(cell) -> str | None:
    """The URL an image cell holds instead of an image, if it does."""
    value = cell.get("path") if isinstance(cell, dict) and not cell.get("bytes") else cell
    return value if isinstance(value, str) and "://" in value else None


def refuse_url(url: str, column: str, row, source):
    raise ValueError(
        f"--image_column {column} of {source} holds URLs (row {row}: {url}): Flaminko reads images from the dataset "
        "or local files and downloads nothing; download them first (img2dataset writes tar shards that "
        "--data_format webdataset reads)"
    )


def image_source(cell, root: Path):
    """A file object over a datasets.Image cell's bytes, or a path (the cell's own, or a string relative
    to `root`); None for an empty cell."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return io.BytesIO(cell["bytes"])
        cell = cell.get("path")
    return str(root / cell) if isinstance(cell, str) and cell else None


class DatasetImage:
    """The image of one dataset row, read when used: an evaluation set can hold far more images than
    memory. Its name (`str`) stands for it in the predictions and in RICES' cache key."""

    def __init__(self, cells, row: int, column: str, root: Path, name: str):
        self.cells, self.row, self.column, self.root, self.name = cells, row, column, root, name

    def open(self) -> Image.Image:
        found = image_source(self.cells[self.row][self.column], self.root)
        if found is None:
            raise ValueError(f"{self.name}: the row has no image")
        try:
            return decode_image_file(found)
        except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"{self.name}: cannot read the row's image ({error})") from error

    def __str__(self):
        return self.name


def openable(image):
    """What load_image takes for an image of an evaluation sample: a DatasetImage opened, else as it is."""
    return image.open() if isinstance(image, DatasetImage) else image


def row_images(dataset, column: str, root: Path, label: str) -> list:
    """One image per row, for an evaluation set: a path where the cell names a file (checked like any
    image path), else a DatasetImage. When the first row holds its image's bytes, the rows are not read
    now (that would read every image)."""
    cells = dataset.select_columns([column])
    first = cells[0][column] if len(cells) else None
    if isinstance(first, dict) and first.get("bytes"):
        return [DatasetImage(cells, row, column, root, f"{label}[{row}]") for row in range(len(cells))]
    images = []
    for row, record in enumerate(cells):
        url = image_url(record[column])
        if url:
            refuse_url(url, column, row, label)
        found = image_source(record[column], root)
        images.append(found if isinstance(found, str) else DatasetImage(cells, row, column, root, f"{label}[{row}]"))
    return images


def default_root(source) -> Path:
    """Where image paths of a dataset are relative to: a local dataset's folder, else the working folder."""
    path = Path(str(source))
    return path.parent if path.is_file() else path if path.is_dir() else Path(".")


def single_caption(caption, column: str, row, source):
    if isinstance(caption, (list, tuple)):
        raise ValueError(
            f"--text_column {column} of {source} holds lists of captions (row {row}): training takes one caption a row; "
            "give one row per caption (e.g. with datasets' map(batched=True))"
        )


class CaptionRows(TorchDataset):
    """Image-caption pairs of a Hugging Face dataset, one caption a row, checked as CaptionTable checks a
    table: rows with an empty caption or an unreadable image are left out and counted, the first ones
    named by row (`skipped`). Other columns are kept in the samples; images are read when used."""

    def __init__(self, dataset, *, source, image_column=None, text_column=None, hangul_only=False):
        columns = column_names(dataset)
        self.image_column = find_column(columns, "image", image_column, source)
        self.text_column = find_column(columns, "text", text_column, source)
        self.dataset = with_undecoded_images(dataset, self.image_column)
        self.root = default_root(source)
        self.skipped = Skipped()
        self.rows = []
        cells = self.dataset.select_columns([self.image_column, self.text_column])
        for row, record in enumerate(tqdm(cells, desc=f"checking {source}", unit="row", disable=len(cells) < 1000)):
            image, caption = record[self.image_column], record[self.text_column]
            url = image_url(image)
            if url:
                refuse_url(url, self.image_column, row, source)
            single_caption(caption, self.text_column, row, source)
            found = image_source(image, self.root)
            problem = caption_problem(caption, hangul_only=hangul_only) or ("missing image file" if found is None else image_problem(found))
            if problem:
                self.skipped.note(problem, row)
            else:
                self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        record = self.dataset[self.rows[index]]
        image = image_source(record.pop(self.image_column), self.root)
        caption = record.pop(self.text_column)
        # A file object is opened lazily here; the collator decodes it and skips it if it cannot.
        return {**record, "text": pair_text(caption), "images": [Image.open(image) if isinstance(image, io.BytesIO) else image]}


class StreamedCaptions(TorchIterableDataset):
    """Image-caption pairs read from a streamed Hugging Face dataset (an IterableDataset, already this
    process's part of it) in its stored order, without loading it whole. Bad rows are skipped and
    counted, named by their row in this process's pass (`skipped`).

    Each sample carries the stream's state after its row (`stream_state`): the trainer saves the last
    trained one with each checkpoint, and `resume` restores it, so a resumed run reads on from there,
    no example twice. Each iteration is a pass over the stream (the datasets epoch)."""

    def __init__(self, stream, *, source, image_column=None, text_column=None, hangul_only=False):
        columns = column_names(stream)
        self.image_column = find_column(columns, "image", image_column, source)
        self.text_column = find_column(columns, "text", text_column, source)
        self.stream = with_undecoded_images(stream, self.image_column)
        self.source, self.hangul_only = source, hangul_only
        self.root = default_root(source)
        self.skipped = Skipped()
        self.passes = 0
        first = next(iter(self.stream), None)
        if first is not None:  # what no later row could fix is said now, before training starts
            url = image_url(first[self.image_column])
            if url:
                refuse_url(url, self.image_column, 0, source)
            single_caption(first[self.text_column], self.text_column, 0, source)

    def resume(self, checkpoint, rank: int):
        """Continue from the position that `checkpoint` (a folder) saved for process `rank`."""
        state_file = Path(checkpoint) / STREAM_STATE_FILE.format(rank=rank)
        if not state_file.is_file():
            raise ValueError(
                f"{checkpoint} holds no stream position for this process ({state_file.name}): it was saved by a run "
                "that did not stream its data, or by another number of processes"
            )
        state = json.loads(state_file.read_text(encoding="utf-8"))
        self.stream.load_state_dict(state)
        self.passes = state["epoch"]

    def __iter__(self):
        # The datasets epoch applies a restored state to its own pass only; later passes start afresh.
        self.stream.set_epoch(self.passes)
        self.passes += 1
        for row, record in enumerate(self.stream):
            sample, problem = self._sample(record)
            if problem:
                self.skipped.note(problem, row)
                continue
            yield {**sample, STREAM_STATE: self.stream.state_dict()}

    def _sample(self, record):
        cell, caption = record.pop(self.image_column), record.pop(self.text_column)
        if image_url(cell):
            return None, "image URL"
        problem = caption_problem(caption, hangul_only=self.hangul_only)
        found = image_source(cell, self.root)
        if problem is None and found is None:
            problem = "missing image file"
        if problem:
            return None, problem
        try:
            image = load_image(decode_image_file(found))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            return None, "unreadable image"
        return {**record, "text": pair_text(caption), "images": [image]}, None
