"""`flaminko eval` end to end on tiny data in every format: results, predictions, resume, errors, two processes."""

import json
import re
import socket
import subprocess
import sys

import pytest

from conftest import build_model, noise_image
from flaminko.cli import main
from flaminko.evaluation import evaluate
from flaminko.evaluation.datasets import load_captioning, load_classification, load_vqa


@pytest.fixture(scope="module")
def model_folder(backbones, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-model")
    model, processor = build_model(backbones)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six images and one file per supported layout."""
    root = tmp_path_factory.mktemp("eval-data")
    (root / "images").mkdir()
    names = []
    for n in range(6):
        name = f"COCO_val2014_{n:012d}.jpg"
        noise_image(n).save(root / "images" / name)
        names.append(name)
    files = {}
    karpathy = {
        "images": [
            {"filepath": "images", "filename": name, "split": "test" if n < 3 else ("train" if n < 5 else "restval"),
             "cocoid": n, "sentences": [{"raw": f"A photo number {n}."}, {"raw": "A noisy picture."}]}
            for n, name in enumerate(names)
        ]
    }  # fmt: skip
    files["karpathy"] = root / "karpathy.json"
    files["karpathy"].write_text(json.dumps(karpathy))
    files["captions_tsv"] = root / "captions.tsv"
    files["captions_tsv"].write_text(
        "image\tcaption\n"
        + "".join(f"images/{name}\t빨간색 원 {n}\nimages/{name}\t그림\n" for n, name in enumerate(names))
    )
    files["captions_jsonl"] = root / "captions.jsonl"
    files["captions_jsonl"].write_text(
        "".join(json.dumps({"image": f"images/{name}", "captions": ["a", "b"]}) + "\n" for name in names)
    )
    questions = {"questions": [{"question_id": 100 + n, "image_id": n, "question": f"What is {n}?"} for n in range(6)]}
    annotations = {
        "annotations": [
            {"question_id": 100 + n, "image_id": n, "answers": [{"answer": "two"}] * 6 + [{"answer": "3"}] * 4}
            for n in range(6)
        ]
    }
    files["vqa_questions"], files["vqa_annotations"] = root / "questions.json", root / "annotations.json"
    files["vqa_questions"].write_text(json.dumps(questions))
    files["vqa_annotations"].write_text(json.dumps(annotations))
    files["textvqa"] = root / "textvqa.json"
    files["textvqa"].write_text(
        json.dumps(
            {"data": [{"question_id": n, "image_id": n, "question": "q", "answers": ["a"] * 10} for n in range(6)]}
        )
    )
    files["vizwiz"] = root / "vizwiz.json"
    files["vizwiz"].write_text(
        json.dumps([{"image": name, "question": "q", "answers": [{"answer": "x"}] * 10} for name in names])
    )
    files["vqa_tsv"] = root / "vqa.tsv"
    files["vqa_tsv"].write_text(
        "image\tquestion\tanswers\n" + "".join(f"images/{name}\t무슨 색?\t빨간색|빨강|빨간색\n" for name in names)
    )
    files["classes"] = root / "classes.txt"
    files["classes"].write_text("cat\ndog\nred car\n")
    files["labels"] = root / "labels.tsv"
    files["labels"].write_text(
        "image\tlabel\n" + "".join(f"images/{name}\t{['cat', 'dog', '2'][n % 3]}\n" for n, name in enumerate(names))
    )
    files["memes"] = root / "memes.jsonl"
    files["memes"].write_text(
        "".join(
            json.dumps({"id": n, "img": f"images/{name}", "label": n % 2, "text": "hi"}) + "\n"
            for n, name in enumerate(names)
        )
    )
    files["root"] = root
    return files


def test_loaders_read_every_layout(data):
    test = load_captioning(data["karpathy"], split="test")
    assert [s["id"] for s in test] == [0, 1, 2] and test[0]["captions"] == ["A photo number 0.", "A noisy picture."]
    assert [s["id"] for s in load_captioning(data["karpathy"], split="train")] == [3, 4, 5]  # restval joins train
    assert load_captioning(data["captions_tsv"])[1]["captions"] == ["빨간색 원 1", "그림"]
    assert load_captioning(data["captions_jsonl"])[0]["captions"] == ["a", "b"]
    vqa = load_vqa(data["vqa_questions"], data["vqa_annotations"], image_root=data["root"] / "images")
    assert vqa[2]["image"].endswith("COCO_val2014_000000000002.jpg") and len(vqa[2]["answers"]) == 10
    assert load_vqa(data["textvqa"], image_root=data["root"] / "images")[3]["image"].endswith("000000000003.jpg")
    assert load_vqa(data["vizwiz"], image_root=data["root"] / "images")[0]["answers"] == ["x"] * 10
    assert load_vqa(data["vizwiz"], image_root=data["root"] / "images")[0]["layout"] == "vizwiz"
    assert load_vqa(data["vqa_tsv"])[0]["answers"] == ["빨간색", "빨강", "빨간색"]
    labels = load_classification(data["labels"], ["cat", "dog", "red car"])
    assert [s["class_name"] for s in labels[:3]] == ["cat", "dog", "red car"]  # "2" is an index
    memes = load_classification(data["memes"], ["no", "yes"])
    assert memes[1]["class_name"] == "yes" and memes[1]["ocr"] == "hi"


def test_captioning_few_shot_results_and_predictions(model_folder, data, tmp_path):
    report = evaluate(
        str(model_folder), task="captioning", data=data["karpathy"], support=data["karpathy"], shots=[0, 2], trials=2,
        max_new_tokens=4, batch_size=2, output_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert report["shots"] == [0, 2] and report["num_samples"] == 3 and report["trials"] == 2
    assert report["decoding"] == {"num_beams": 3, "max_new_tokens": 4, "length_penalty": 0.0}
    for shots in ("0", "2"):
        assert len(report["metrics"][shots]["CIDEr"]["trials"]) == 2
        assert report["metrics"][shots]["tokenizer"] in ("ptb", "korean")
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == report["metrics"]
    records = [
        json.loads(line) for line in (tmp_path / "predictions-captioning-2shot-trial1.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in records] == [0, 1, 2]
    assert all(set(r["demonstrations"]) <= {3, 4, 5} and len(r["demonstrations"]) == 2 for r in records)
    assert records[0]["prompt"].count("<image>") == 3 and records[0]["prompt"].endswith("<image>Output:")
    zero = json.loads((tmp_path / "predictions-captioning-0shot-trial0.jsonl").read_text().splitlines()[0])
    assert zero["prompt"].count("<image>") == 1 and len(zero["demonstrations"]) == 2  # two text-only demonstrations


def test_rices_demonstrations_and_vqa(model_folder, data, tmp_path):
    report = evaluate(
        str(model_folder), task="vqa", data=data["vqa_questions"], annotations=data["vqa_annotations"],
        support=data["vqa_tsv"], image_root=data["root"] / "images", shots=[2], rices=True,
        rices_cache=tmp_path / "cache", limit=2, batch_size=2, output_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert report["demonstrations"] == "rices" and report["num_samples"] == 2
    assert report["decoding"]["max_new_tokens"] == 5
    assert 0 <= report["metrics"]["2"]["VQA accuracy"]["mean"] <= 100
    records = [json.loads(line) for line in (tmp_path / "predictions-vqa-2shot-trial0.jsonl").read_text().splitlines()]
    # The support table holds the same images: each query's own image is the most similar, placed last.
    assert [r["demonstrations"][-1] for r in records] == [0, 1]
    assert list((tmp_path / "cache").glob("rices-*.safetensors"))


def test_ok_vqa_predictions_are_stemmed_before_scoring(model_folder, data, tmp_path):
    from flaminko.evaluation.ok_vqa import stem_ok_vqa_answer
    from flaminko.evaluation.prompts import PROMPT_FORMATS, postprocess

    # OK-VQA v1.1 annotations: stemmed answers, each with its raw form.
    annotations = {
        "annotations": [
            {"question_id": 100 + n, "image_id": n, "answers": [{"answer": "ride", "raw_answer": "riding"}] * 10}
            for n in range(6)
        ]
    }
    (tmp_path / "ok_vqa_annotations.json").write_text(json.dumps(annotations))
    report = evaluate(
        str(model_folder), task="vqa", data=data["vqa_questions"], annotations=tmp_path / "ok_vqa_annotations.json",
        image_root=data["root"] / "images", limit=3, num_beams=1, output_dir=tmp_path / "out", progress=False,
    )  # fmt: skip
    assert "OK-VQA stemming" in report["answer_stemming"]
    predictions = (tmp_path / "out" / "predictions-vqa-0shot-trial0.jsonl").read_text()
    records = [json.loads(line) for line in predictions.splitlines()]
    template = PROMPT_FORMATS["open_flamingo"]
    assert [r["prediction"] for r in records] == [
        stem_ok_vqa_answer(postprocess("vqa", r["generated"], template)) for r in records
    ]
    vqav2 = evaluate(
        str(model_folder), task="vqa", data=data["vqa_questions"], annotations=data["vqa_annotations"],
        image_root=data["root"] / "images", limit=1, num_beams=1, output_dir=tmp_path / "vqav2", progress=False,
    )  # fmt: skip
    assert "answer_stemming" not in vqav2


def test_classification_ranks_class_names_with_the_ranking_api(model_folder, data, tmp_path):
    from flaminko.evaluation.runner import load_model
    from flaminko.evaluation.ranking import score_candidates

    report = evaluate(
        str(model_folder), task="classification", data=data["labels"], class_names=data["classes"], batch_size=4,
        output_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert set(report["metrics"]["0"]) == {"top-1 accuracy", "top-5 accuracy"}
    assert report["metrics"]["0"]["top-5 accuracy"]["mean"] == 100.0  # three classes
    record = json.loads((tmp_path / "predictions-classification-0shot-trial0.jsonl").read_text().splitlines()[0])
    model, processor = load_model(str(model_folder))
    scores = score_candidates(
        model, processor, ["<image>Output:"], [[record["image"]]], ["cat", "dog", "red car"], length_normalize=True
    )
    assert record["ranking"] == [["cat", "dog", "red car"][i] for i in scores[0].argsort(descending=True).tolist()]
    memes = evaluate(
        str(model_folder), task="classification", data=data["memes"], class_names=["no", "yes"], output_dir=tmp_path / "memes",
        progress=False,
    )  # fmt: skip
    assert 0 <= memes["metrics"]["0"]["ROC AUC"]["mean"] <= 100


def test_an_interrupted_evaluation_resumes_from_its_predictions(model_folder, data, tmp_path):
    options = dict(
        task="captioning", data=data["captions_tsv"], max_new_tokens=3, num_beams=1, batch_size=2, progress=False
    )
    full = evaluate(str(model_folder), output_dir=tmp_path / "full", **options)
    lines = (tmp_path / "full" / "predictions-captioning-0shot-trial0.jsonl").read_text().splitlines()
    # An interruption after two samples leaves the record of the run and the first lines of a rank's part file.
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "provenance.json").write_text((tmp_path / "full" / "provenance.json").read_text())
    marked = [json.loads(line) for line in lines[:2]]
    for record in marked:
        record["generated"] = "from the first run"
    (tmp_path / "resumed" / "predictions-captioning-0shot-trial0.rank0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in marked)
    )
    resumed = evaluate(str(model_folder), output_dir=tmp_path / "resumed", **options)
    records = [
        json.loads(line)
        for line in (tmp_path / "resumed" / "predictions-captioning-0shot-trial0.jsonl").read_text().splitlines()
    ]
    assert [r["generated"] for r in records[:2]] == ["from the first run"] * 2  # kept, not recomputed
    assert [r["prediction"] for r in records] == [json.loads(line)["prediction"] for line in lines]
    assert resumed["metrics"] == full["metrics"]
    assert not list((tmp_path / "resumed").glob("*.rank*.jsonl"))


RESUME_OPTIONS = dict(max_new_tokens=3, num_beams=1, batch_size=2, progress=False)


def test_a_torn_last_line_is_dropped_with_a_note_and_predicted_again(model_folder, data, tmp_path, capsys):
    options = dict(task="captioning", data=data["captions_tsv"], **RESUME_OPTIONS)
    full = evaluate(str(model_folder), output_dir=tmp_path, **options)
    final = tmp_path / "predictions-captioning-0shot-trial0.jsonl"
    lines = final.read_bytes().splitlines(keepends=True)
    # A kill mid-write: two whole lines, then a line cut inside a Hangul character.
    part = tmp_path / "predictions-captioning-0shot-trial0.rank0.jsonl"
    torn = lines[2][: lines[2].index("원".encode()) + 1]
    final.unlink()
    part.write_bytes(b"".join(lines[:2]) + torn)
    capsys.readouterr()
    resumed = evaluate(str(model_folder), output_dir=tmp_path, **options)
    note = capsys.readouterr().err
    assert "torn line" in note and str(part) in note
    assert resumed["metrics"] == full["metrics"] and final.read_bytes() == b"".join(lines)


def test_a_damaged_predictions_file_is_named(model_folder, data, tmp_path):
    options = dict(task="captioning", data=data["captions_tsv"], **RESUME_OPTIONS)
    evaluate(str(model_folder), output_dir=tmp_path, **options)
    final = tmp_path / "predictions-captioning-0shot-trial0.jsonl"
    lines = final.read_text().splitlines(keepends=True)
    final.write_text(lines[0] + '{"id": "cut\n' + "".join(lines[2:]))
    with pytest.raises(ValueError, match=re.escape(f"{str(final)!r} line 2 is not a prediction record")):
        evaluate(str(model_folder), output_dir=tmp_path, **options)


def test_predictions_of_another_run_are_never_mixed(model_folder, data, tmp_path, capsys):
    options = dict(task="captioning", data=data["captions_tsv"], **RESUME_OPTIONS)
    evaluate(str(model_folder), output_dir=tmp_path, **options)
    changes = {
        "decoding: was": dict(options, max_new_tokens=4),
        "data: was": dict(options, data=data["captions_jsonl"]),
        "prompt_format: was": dict(options, prompt_format="plain"),
        "seed: was 42, now 7": dict(options, seed=7),
        "dtype: was \"float32\", now \"bfloat16\"": dict(options, dtype="bfloat16"),
        "task: was": dict(options, task="vqa", data=data["vqa_tsv"]),
    }
    for message, changed in changes.items():
        with pytest.raises(ValueError, match="holds predictions of another run") as error:
            evaluate(str(model_folder), output_dir=tmp_path, **changed)
        assert message in str(error.value)
    # The same model folder with its weights saved again, and a data file rewritten in place.
    copy = data["root"] / "rewritten.tsv"
    copy.write_text(data["captions_tsv"].read_text())
    evaluate(str(model_folder), output_dir=tmp_path / "copy", **dict(options, data=copy))
    copy.write_text(data["captions_tsv"].read_text().replace("그림", "사진"))
    with pytest.raises(ValueError, match=f"data: {re.escape(repr(str(copy)))} has changed since"):
        evaluate(str(model_folder), output_dir=tmp_path / "copy", **dict(options, data=copy))
    weights = model_folder / "model.safetensors"
    weights.touch()
    with pytest.raises(ValueError, match=f"model: {re.escape(repr(str(model_folder)))} has changed since"):
        evaluate(str(model_folder), output_dir=tmp_path, **options)
    # Predictions without a record (an older Flaminko's) cannot be vouched for; on the command line, one line.
    (tmp_path / "provenance.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_folder), "--task", "captioning", "--data", str(data["captions_tsv"]),
              "--max_new_tokens", "3", "--num_beams", "1", "--out", str(tmp_path)])  # fmt: skip
    stderr = capsys.readouterr().err
    error = stderr.splitlines()[-1]  # after the weights' loading bar
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert error.startswith("flaminko eval: error: ") and "without provenance.json" in error


def test_cli_prints_results_and_writes_them(model_folder, data, tmp_path, capsys):
    main([
        "eval", "--model", str(model_folder), "--task", "vqa", "--data", str(data["vqa_tsv"]), "--support",
        str(data["vqa_tsv"]), "--shots", "0", "1", "--limit", "2", "--batch-size", "2", "--num_beams", "1",
        "--out", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "vqa 0-shot (2 samples, 1 trials): VQA accuracy" in out and "vqa 1-shot" in out
    assert json.loads((tmp_path / "results.json").read_text())["processes"] == 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--task", "captioning", "--data", "{root}/missing.tsv"], "Data file not found"),
        (["--task", "vqa", "--data", "{root}/questions.json"], "pass their annotations JSON too"),
        (
            ["--task", "classification", "--data", "{root}/labels.tsv", "--class_names", "{root}/empty.txt"],
            "class name list is empty",
        ),
        (["--task", "captioning", "--data", "{root}/broken.tsv"], "image files of .* are missing"),
        (["--task", "captioning", "--data", "{root}/captions.tsv", "--shots", "4"], "need a support set"),
        (
            ["--task", "vqa", "--data", "{root}/questions.json", "--annotations", "{root}/few_annotations.json"],
            "have no annotation",
        ),
        (
            ["--task", "captioning", "--data", "{root}/captions.tsv", "--support", "{root}/one.tsv", "--shots", "4"],
            "support set has 1",
        ),
        (["--task", "vqa", "--data", "{root}/textvqa_broken.json"], "has no 'question' field"),
    ],
)
def test_bad_data_is_one_line_error(model_folder, data, tmp_path, capsys, arguments, message):
    root = data["root"]
    (root / "empty.txt").write_text("\n")
    (root / "broken.tsv").write_text("image\tcaption\nimages/nowhere.png\tx\n")
    (root / "textvqa_broken.json").write_text(json.dumps({"data": [{"question_id": 1, "image_id": 0}]}))
    (root / "one.tsv").write_text("image\tcaption\nimages/COCO_val2014_000000000000.jpg\tx\n")
    annotations = json.loads(data["vqa_annotations"].read_text())
    annotations["annotations"] = annotations["annotations"][:2]
    (root / "few_annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_folder), "--out", str(tmp_path)] + [a.format(root=root) for a in arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("flaminko eval: error: ") and error.count("\n") == 1
    assert re.search(message, error), error


def test_two_processes_gather_once_and_match_one(model_folder, data, tmp_path):
    """docs/evaluation.md's `torchrun --nproc_per_node 2 -m flaminko.cli eval ...`: both ranks exit 0
    (the command tears its process group down), and only the main process reports."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "flaminko.cli", "eval", "--model", str(model_folder), "--task", "captioning",
        "--data", str(data["captions_tsv"]), "--support", str(data["captions_tsv"]), "--shots", "1", "--max_new_tokens", "3",
        "--num_beams", "1", "--batch_size", "2", "--device", "cpu", "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("results: ")] == [f"results: {tmp_path / 'two'}/results.json"]
    report = json.loads((tmp_path / "two" / "results.json").read_text())
    single = evaluate(
        str(model_folder), task="captioning", data=data["captions_tsv"], support=data["captions_tsv"], shots=[1],
        max_new_tokens=3, num_beams=1, batch_size=2, output_dir=tmp_path / "one", progress=False,
    )  # fmt: skip
    assert report["processes"] == 2 and report["metrics"] == single["metrics"]
    two = (tmp_path / "two" / "predictions-captioning-1shot-trial0.jsonl").read_text()
    one = (tmp_path / "one" / "predictions-captioning-1shot-trial0.jsonl").read_text()
    assert two == one


def test_dtype_and_device_are_applied(model_folder, data, tmp_path):
    report = evaluate(
        str(model_folder), task="vqa", data=data["vqa_tsv"], limit=1, num_beams=1, dtype="bfloat16", device="cpu",
        output_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert (report["dtype"], report["device"]) == ("bfloat16", "cpu")
    assert report["decoding"]["max_new_tokens"] == 5
    textvqa = evaluate(
        str(model_folder), task="vqa", data=data["textvqa"], image_root=data["root"] / "images", limit=1, num_beams=1,
        output_dir=tmp_path / "textvqa", progress=False,
    )  # fmt: skip
    assert textvqa["decoding"]["max_new_tokens"] == 10  # OpenFlamingo's for TextVQA and VizWiz
    with pytest.raises(ValueError, match="--dtype"):
        evaluate(str(model_folder), task="vqa", data=data["vqa_tsv"], dtype="fp8", output_dir=tmp_path, progress=False)
