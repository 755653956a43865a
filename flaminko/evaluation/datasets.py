"""Evaluation data: each loader returns a list of samples, every image file checked up front.

- captioning: {"id", "image", "captions": [...]} from a Karpathy-split JSON (COCO, Flickr30K:
  images with "filename" (and "filepath"), "split", "sentences"[{"raw"}]) or a TSV/CSV/JSONL table
  of image, caption (rows of one image are grouped; a JSONL row may carry a "captions" list).
- vqa: {"id", "image", "question", "answers": [...]} (+ "layout" for OK-VQA, TextVQA and VizWiz) from VQAv2 / OK-VQA questions + annotations
  JSON, TextVQA ({"data": [...]}), VizWiz (a list of {"image", "question", "answers"}) or a table
  with image, question, answers ("|"-separated in TSV/CSV).
- classification: {"id", "image", "class_name"} (+ "ocr" for Hateful-Memes-style rows with "text")
  from a table whose "label" is a class name or an index into the class names.

Image paths are relative to `image_root` (default: the data file's folder).

A Hugging Face dataset (a Hub id, a Parquet file or folder, a save_to_disk folder) gives one sample a
row, its columns found by role (flaminko.hf_datasets.COLUMNS) or named: captioning an image and its
captions (a list, a list of {"raw": ...} as in Karpathy's JSON, or one), VQA a question and its
answers, classification a label (and "text" as the meme's text); the id is the row's question_id
(VQA), id (classification) or image_id (captioning), else its row number. Images stay in the dataset
until used (flaminko.hf_datasets.DatasetImage) unless the rows name files.
"""

import json
from collections import defaultdict
from pathlib import Path

from ..data import read_table
from ..hf_datasets import column_names, default_root, find_column, is_datasets_source, load_source, row_images, with_undecoded_images

TASKS = ("captioning", "vqa", "classification")


def _read_json(path: Path):
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"Data file not found: {str(path)!r}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None


def _column(row: dict, names: tuple, path: Path):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    raise ValueError(f"{str(path)!r}: a row has no {' / '.join(names)} column: {row}")


def check_images(samples: list[dict], source) -> list[dict]:
    """Every sample's image file exists (images kept in a dataset are read when used), or one error
    naming the missing ones."""
    missing = [sample["image"] for sample in samples if isinstance(sample["image"], str) and not Path(sample["image"]).is_file()]
    if missing:
        shown = ", ".join(repr(str(path)) for path in missing[:3])
        raise ValueError(
            f"{len(missing)} of {len(samples)} image files of {str(source)!r} are missing ({shown}"
            f"{', ...' if len(missing) > 3 else ''}): check the paths or --image_root"
        )
    if not samples:
        raise ValueError(f"{str(source)!r} holds no samples")
    return samples


def load_captioning(path, image_root=None, split: str | None = None) -> list[dict]:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{str(path)!r} is not a Karpathy-split JSON (no 'images' list)")
        samples = []
        for entry in data["images"]:
            if split is not None and entry.get("split") not in {split} | ({"restval"} if split == "train" else set()):
                continue
            captions = [sentence["raw"] for sentence in entry.get("sentences", [])]
            if not captions:
                raise ValueError(f"{str(path)!r}: image {entry.get('filename')!r} has no sentences")
            key = entry.get("cocoid", entry.get("imgid", entry["filename"]))
            samples.append(
                {"id": key, "image": str(root / entry.get("filepath", "") / entry["filename"]), "captions": captions}
            )
        return check_images(samples, path)
    grouped = defaultdict(list)
    for row in read_table(path):
        image = _column(row, ("image", "image_path", "file_name"), path)
        captions = row.get("captions") or [_column(row, ("caption", "text"), path)]
        grouped[image] += [captions] if isinstance(captions, str) else list(captions)
    samples = [{"id": image, "image": str(root / image), "captions": captions} for image, captions in grouped.items()]
    return check_images(samples, path)


def _image_index(root: Path) -> dict:
    """Image files by name, stem and trailing number, for VQA layouts that give only an image id."""
    index = {}
    if root.is_dir():
        for file in root.iterdir():
            index[file.name] = index[file.stem] = file
            number = file.stem.rsplit("_", 1)[-1]
            if number.isdigit():
                index.setdefault(str(int(number)), file)
    return index


def _vqa_image(image_id, index: dict, root: Path) -> str:
    found = index.get(str(image_id))
    return str(found if found is not None else root / str(image_id))


def _answers(value) -> list[str]:
    if isinstance(value, str):
        return [answer.strip() for answer in value.split("|")]
    return [answer["answer"] if isinstance(answer, dict) else answer for answer in value]


def load_vqa(path, annotations=None, image_root=None) -> list[dict]:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if path.suffix != ".json":
        samples = []
        for number, row in enumerate(read_table(path)):
            samples.append(
                {
                    "id": row.get("question_id", number),
                    "image": str(root / _column(row, ("image", "image_path"), path)),
                    "question": _column(row, ("question",), path),
                    "answers": _answers(_column(row, ("answers", "answer"), path)),
                }
            )
        return check_images(samples, path)
    data = _read_json(path)
    index = _image_index(root)
    if isinstance(data, list):  # VizWiz: one list of image, question, answers
        samples = [
            {
                "id": row.get("question_id", row["image"]),
                "image": _vqa_image(row["image"], index, root),
                "question": row["question"],
                "answers": _answers(row.get("answers", [])),
                "layout": "vizwiz",
            }
            for row in data
        ]
    elif "data" in data:  # TextVQA
        samples = [
            {
                "id": row["question_id"],
                "image": _vqa_image(row["image_id"], index, root),
                "question": row["question"],
                "answers": _answers(row.get("answers", [])),
                "layout": "textvqa",
            }
            for row in data["data"]
        ]
    elif "questions" in data:  # VQAv2 / OK-VQA
        if annotations is None:
            raise ValueError(f"{str(path)!r} holds VQAv2-style questions: pass their annotations JSON too")
        annotated = _read_json(Path(annotations))["annotations"]
        answers = {row["question_id"]: _answers(row["answers"]) for row in annotated}
        # OK-VQA v1.1 stems its answers and keeps each one's raw form: predictions are stemmed to match.
        ok_vqa = any(isinstance(a, dict) and "raw_answer" in a for row in annotated[:1] for a in row["answers"])
        unanswered = [row["question_id"] for row in data["questions"] if row["question_id"] not in answers]
        if unanswered:
            raise ValueError(
                f"{len(unanswered)} questions of {str(path)!r} have no annotation in {str(annotations)!r} "
                f"(question ids {unanswered[:5]}): are they the same split?"
            )
        samples = [
            {
                "id": row["question_id"],
                "image": _vqa_image(row["image_id"], index, root),
                "question": row["question"],
                "answers": answers[row["question_id"]],
                **({"layout": "ok_vqa"} if ok_vqa else {}),
            }
            for row in data["questions"]
        ]
    else:
        raise ValueError(f"{str(path)!r} is not a VQAv2, OK-VQA, TextVQA or VizWiz file")
    empty = [sample["id"] for sample in samples if not sample["answers"]]
    if empty:
        raise ValueError(f"{len(empty)} questions of {str(path)!r} have no answers (ids {empty[:5]})")
    return check_images(samples, path)


def load_class_names(path_or_names) -> list[str]:
    """Class names from a list, a JSON list file, or a text file with one name a line."""
    if isinstance(path_or_names, (list, tuple)):
        names = list(path_or_names)
    else:
        path = Path(path_or_names)
        if path.suffix == ".json":
            names = _read_json(path)
        elif path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise ValueError(f"Class names file not found: {str(path)!r}")
    if not names:
        raise ValueError("The class name list is empty: classification needs at least two class names")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"Classification needs at least two distinct class names; got {names[:10]}")
    return [str(name) for name in names]


def _class_name(label, class_names: list[str], source) -> str:
    """A row's label as a class name: a name, or an index into the class names."""
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit() and label not in class_names):
        if not 0 <= int(label) < len(class_names):
            raise ValueError(f"{str(source)!r}: label {label} is not an index into the {len(class_names)} class names")
        label = class_names[int(label)]
    if label not in class_names:
        raise ValueError(f"{str(source)!r}: label {label!r} is not one of the class names {class_names[:10]}")
    return label


def load_classification(path, class_names, image_root=None) -> list[dict]:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    samples = []
    for number, row in enumerate(read_table(path)):
        sample = {
            "id": row.get("id", number),
            "image": str(root / _column(row, ("image", "img"), path)),
            "class_name": _class_name(_column(row, ("label", "class_name"), path), class_names, path),
        }
        if row.get("text") is not None:
            sample["ocr"] = row["text"]
        samples.append(sample)
    return check_images(samples, path)


# The columns each task reads besides the image, and the one that gives a sample its id.
TASK_COLUMNS = {"captioning": ("text",), "vqa": ("question", "answers"), "classification": ("label",)}
ID_COLUMNS = {"captioning": "image_id", "vqa": "question_id", "classification": "id"}
SPLIT_OPTIONS = {"--data": "--split", "--support": "--support_split"}


def _captions(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [caption["raw"] if isinstance(caption, dict) else caption for caption in value]


def load_dataset_rows(task: str, source, *, split, config=None, class_names=None, image_root=None, columns=None, option="--data") -> list[dict]:
    """The samples of a Hugging Face dataset, one a row; `columns` maps image_column, text_column,
    question_column, answers_column, label_column to the columns given (the others are found)."""
    columns = columns or {}
    dataset = load_source(source, split=split, config=config, option=option, split_option=SPLIT_OPTIONS[option])
    names = column_names(dataset)
    image_column = find_column(names, "image", columns.get("image_column"), source)
    read = {role: find_column(names, role, columns.get(f"{role}_column"), source) for role in TASK_COLUMNS[task]}
    id_column = ID_COLUMNS[task] if ID_COLUMNS[task] in names else None
    ocr_column = "text" if task == "classification" and "text" in names else None
    dataset = with_undecoded_images(dataset, image_column)
    label = str(source) if split is None or str(source).endswith(".parquet") else f"{source}:{split}"
    images = row_images(dataset, image_column, Path(image_root) if image_root else default_root(source), label)
    wanted = [*read.values(), *(name for name in (id_column, ocr_column) if name)]
    samples = []
    for row, (record, image) in enumerate(zip(dataset.select_columns(wanted), images)):
        sample = {"id": record[id_column] if id_column else row, "image": image}
        if task == "captioning":
            sample["captions"] = _captions(record[read["text"]])
        elif task == "vqa":
            answers = record[read["answers"]]
            sample.update(question=record[read["question"]], answers=_answers(answers))
            if any(isinstance(answer, dict) and "raw_answer" in answer for answer in answers[:1]):
                sample["layout"] = "ok_vqa"  # OK-VQA v1.1's stemmed answers, as in its annotations JSON
        else:
            sample["class_name"] = _class_name(record[read["label"]], class_names, source)
            if ocr_column:
                sample["ocr"] = record[ocr_column]
        samples.append(sample)
    return check_images(samples, label)


def load_task_data(
    task: str, path, *, annotations=None, class_names=None, image_root=None, split=None, config=None, columns=None, option="--data"
) -> list[dict]:
    if task in TASKS and is_datasets_source(path):
        return load_dataset_rows(
            task, path, split=split, config=config, class_names=class_names, image_root=image_root, columns=columns, option=option
        )
    loaders = {
        "captioning": lambda: load_captioning(path, image_root, split),
        "vqa": lambda: load_vqa(path, annotations, image_root),
        "classification": lambda: load_classification(path, class_names, image_root),
    }
    if task not in loaders:
        raise ValueError(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}")
    try:
        return loaders[task]()
    except KeyError as error:
        raise ValueError(
            f"{str(path)!r}: an entry has no {error.args[0]!r} field (the {task} layouts are listed in docs/evaluation.md)"
        ) from None
