"""`flaminko eval` on Hugging Face datasets (Parquet, a folder laid out as a Hub dataset repo,
save_to_disk) gives what the same rows give in VQAv2 / Karpathy JSON and tables; bad data is one line."""

import json
import re

import pytest

from fake_hub import write_dataset_repo
from test_eval_runner import data, model_folder  # noqa: F401  (fixtures)
from flaminko.cli import main
from flaminko.evaluation import evaluate

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("offline_datasets")

OPTIONS = dict(max_new_tokens=3, num_beams=1, batch_size=4, progress=False)


def image_cell(path):
    return {"bytes": path.read_bytes(), "path": path.name}


@pytest.fixture(scope="module")
def hub(data, tmp_path_factory):  # noqa: F811
    """The VQAv2 questions of `data` (validation) and its VQA table (train) as a Hub dataset repo's Parquet files,
    images in the files; the Karpathy test split as Parquet naming image files; the memes as save_to_disk."""
    root = tmp_path_factory.mktemp("hf-eval")
    images = data["root"] / "images"
    questions = json.loads(data["vqa_questions"].read_text())["questions"]
    answers = {row["question_id"]: row["answers"] for row in json.loads(data["vqa_annotations"].read_text())["annotations"]}
    features = datasets.Features({
        "question_id": datasets.Value("int64"), "question": datasets.Value("string"), "image": datasets.Image(),
        "answers": [{"answer": datasets.Value("string")}],
    })  # fmt: skip
    validation = datasets.Dataset.from_dict({
        "question_id": [q["question_id"] for q in questions], "question": [q["question"] for q in questions],
        "image": [image_cell(images / f"COCO_val2014_{q['image_id']:012d}.jpg") for q in questions],
        "answers": [answers[q["question_id"]] for q in questions],
    }, features=features)  # fmt: skip
    validation.to_parquet(str(root / "vqav2.parquet"))
    table = [line.split("\t") for line in data["vqa_tsv"].read_text().splitlines()[1:]]
    train = datasets.Dataset.from_dict({  # one schema for both splits, as a Hub configuration has; ids as the table's rows
        "question_id": list(range(len(table))), "question": [q for _, q, _ in table],
        "image": [image_cell(data["root"] / image) for image, _, _ in table],
        "answers": [[{"answer": answer} for answer in a.split("|")] for _, _, a in table],
    }, features=features)  # fmt: skip
    write_dataset_repo(root / "hub", {"validation": [validation], "train": [train]})
    karpathy = [entry for entry in json.loads(data["karpathy"].read_text())["images"] if entry["split"] == "test"]
    datasets.Dataset.from_dict({
        "image_id": [entry["cocoid"] for entry in karpathy], "file_name": [f"images/{entry['filename']}" for entry in karpathy],
        "sentences": [entry["sentences"] for entry in karpathy],
    }).to_parquet(str(root / "karpathy-test.parquet"))  # fmt: skip
    memes = [json.loads(line) for line in data["memes"].read_text().splitlines()]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "id": [m["id"] for m in memes], "img": [image_cell(data["root"] / m["img"]) for m in memes],
        "label": [m["label"] for m in memes], "text": [m["text"] for m in memes],
    }, features=datasets.Features({"id": datasets.Value("int64"), "img": datasets.Image(), "label": datasets.Value("int64"), "text": datasets.Value("string")}))}).save_to_disk(str(root / "memes"))  # fmt: skip
    return root


def predictions(folder, run):
    return [{k: r[k] for k in ("id", "prediction", "demonstrations")} for r in map(json.loads, (folder / f"predictions-{run}.jsonl").read_text().splitlines())]


def test_vqa_on_parquet_gives_the_accuracy_of_the_vqav2_json_files(model_folder, data, hub, tmp_path):  # noqa: F811
    from_json = evaluate(
        str(model_folder), task="vqa", data=data["vqa_questions"], annotations=data["vqa_annotations"],
        image_root=data["root"] / "images", output_dir=tmp_path / "json", **OPTIONS,
    )  # fmt: skip
    from_parquet = evaluate(str(model_folder), task="vqa", data=hub / "vqav2.parquet", output_dir=tmp_path / "parquet", **OPTIONS)
    assert from_parquet["metrics"] == from_json["metrics"] and from_parquet["num_samples"] == 6
    assert predictions(tmp_path / "parquet", "vqa-0shot-trial0") == predictions(tmp_path / "json", "vqa-0shot-trial0")
    record = json.loads((tmp_path / "parquet" / "predictions-vqa-0shot-trial0.jsonl").read_text().splitlines()[2])
    assert record["image"] == f"{hub / 'vqav2.parquet'}[2]"  # the image is named by its row


def test_few_shot_rices_from_a_hub_layout_folder_equals_the_json_and_table(model_folder, data, hub, tmp_path):  # noqa: F811
    common = dict(task="vqa", shots=[2], rices=True, **OPTIONS)
    from_files = evaluate(
        str(model_folder), data=data["vqa_questions"], annotations=data["vqa_annotations"], image_root=data["root"] / "images",
        support=data["vqa_tsv"], rices_cache=tmp_path / "cache", output_dir=tmp_path / "files", **common,
    )  # fmt: skip
    from_hub = evaluate(
        str(model_folder), data=hub / "hub", split="validation", support=hub / "hub", support_split="train",
        rices_cache=tmp_path / "cache", output_dir=tmp_path / "hub", **common,
    )  # fmt: skip
    assert from_hub["metrics"] == from_files["metrics"]
    assert predictions(tmp_path / "hub", "vqa-2shot-trial0") == predictions(tmp_path / "files", "vqa-2shot-trial0")
    assert len(list((tmp_path / "cache").glob("rices-*.safetensors"))) == 2  # the dataset's images have their own key


def test_captioning_and_classification_from_parquet_paths_and_save_to_disk(model_folder, data, hub, tmp_path):  # noqa: F811
    karpathy = evaluate(str(model_folder), task="captioning", data=data["karpathy"], output_dir=tmp_path / "k", **OPTIONS)
    parquet = evaluate(
        str(model_folder), task="captioning", data=hub / "karpathy-test.parquet", image_root=data["root"], output_dir=tmp_path / "p",
        **OPTIONS,
    )  # fmt: skip
    assert parquet["metrics"] == karpathy["metrics"]
    assert predictions(tmp_path / "p", "captioning-0shot-trial0") == predictions(tmp_path / "k", "captioning-0shot-trial0")
    memes = dict(task="classification", class_names=["no", "yes"], batch_size=4, progress=False)
    jsonl = evaluate(str(model_folder), data=data["memes"], output_dir=tmp_path / "j", **memes)
    saved = evaluate(str(model_folder), data=hub / "memes", label_column="label", output_dir=tmp_path / "s", **memes)
    assert saved["metrics"] == jsonl["metrics"] and "ROC AUC" in saved["metrics"]["0"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "vqa", "--data", "{hub}/vqav2.parquet", "--question_column", "query"],
         "--question_column query: .*vqav2.parquet has no such column; its columns: question_id, question, image, answers"),
        (["--task", "vqa", "--data", "{hub}/hub", "--split", "test"], "has no split 'test'; its splits: validation, train \\(choose with --split\\)"),
        (["--task", "vqa", "--data", "{hub}/hub", "--split", "validation", "--support", "{hub}/hub", "--support_split", "dev", "--shots", "1"],
         "--support .* has no split 'dev'; its splits: validation, train \\(choose with --support_split\\)"),
        (["--task", "captioning", "--data", "{hub}/urls.parquet"], "--image_column image of .*urls.parquet holds URLs \\(row 0: https://"),
        (["--task", "classification", "--data", "{hub}/memes", "--class_names", "{hub}/classes.txt", "--label_column", "hateful"],
         "--label_column hateful: .*memes has no such column; its columns: id, img, label, text"),
    ],
)
def test_bad_datasets_are_one_line(model_folder, hub, tmp_path, capsys, arguments, message):  # noqa: F811
    datasets.Dataset.from_dict({"image": ["https://example.com/a.jpg"], "caption": ["x"]}).to_parquet(str(hub / "urls.parquet"))
    (hub / "classes.txt").write_text("only-one\nother\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_folder), "--out", str(tmp_path)] + [a.format(hub=hub) for a in arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' own progress bars
    assert error.startswith("flaminko eval: error: ") and "Traceback" not in error
    assert re.search(message, error), error
