"""Hugging Face datasets as training data: Parquet (a file, a folder, a folder laid out as a Hub dataset
repo with its README metadata), save_to_disk folders, streams. Each gives the batches that the same
rows give as a TSV; a streamed run is split across processes and resumes after SIGKILL where its
checkpoint stood; bad data is named in one line. Everything is built here, offline."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import noise_image
from fake_hub import write_dataset_repo
from test_cli import assert_one_line_error, in_process

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("offline_datasets")

from datasets.distributed import split_dataset_by_node  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from flaminko.data import FlaminkoCollator  # noqa: E402
from flaminko.hf_datasets import CaptionRows, StreamedCaptions, load_source  # noqa: E402
from flaminko.training import DataArguments, FlaminkoTrainer, load_datasets  # noqa: E402

ROWS = 24


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The same rows as a TSV and in every datasets form; row 3 has a broken image, row 5 an empty caption."""
    root = tmp_path_factory.mktemp("hf-datasets")
    (root / "images").mkdir()
    images, captions = [], []
    for row in range(ROWS):
        data = b"\x89PNG not really" if row == 3 else png_bytes(noise_image(row, (24 + row % 3, 24)))
        (root / "images" / f"{row}.png").write_bytes(data)
        images.append(data)
        captions.append("" if row == 5 else f"빨간색 네모 {row}")
    lines = ["image\tcaption"] + [f"images/{row}.png\t{captions[row]}" for row in range(ROWS)]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    cells = [{"bytes": data, "path": f"{row}.png"} for row, data in enumerate(images)]
    table = datasets.Dataset.from_dict({"image": cells, "caption": captions}, features=features)
    table.to_parquet(str(root / "captions.parquet"))
    table.save_to_disk(str(root / "saved"))
    shards = [table.select(range(12)), table.select(range(12, ROWS))]
    write_dataset_repo(root / "hub", {"train": shards, "validation": [table.select(range(4))]}, config_name="ko")
    paths = datasets.Dataset.from_dict({"file_name": [f"images/{row}.png" for row in range(ROWS)], "text": captions})
    paths.to_parquet(str(root / "paths.parquet"))  # image paths relative to the file, under other column names
    return root


def first_batches(dataset, model_and_processor, tmp_path, count=3):
    """The batches the Trainer trains on first: its own dataloader, seed 0, batch size 4."""
    model, processor = model_and_processor
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, seed=0, use_cpu=True,
                             report_to="none", remove_unused_columns=False, max_steps=count)
    trainer = FlaminkoTrainer(model=model, args=args, train_dataset=dataset, data_collator=FlaminkoCollator(processor))
    loader = iter(trainer.get_train_dataloader())
    return [next(loader) for _ in range(count)]


def read(source, **options):
    arguments = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", max_steps=3)
    return load_datasets(DataArguments(train_data=str(source), **options), arguments)[0]


@pytest.mark.parametrize("form", ["captions.parquet", "saved", "hub", "paths.parquet"])
def test_every_form_gives_the_batches_of_the_same_rows_as_a_tsv(form, forms, model_and_processor, tmp_path, capsys):
    table = read(forms / "captions.tsv")
    options = {"config": "ko"} if form == "hub" else {}
    rows = read(forms / form, **options)
    report = capsys.readouterr().out
    assert isinstance(rows, CaptionRows) and len(rows) == len(table) == ROWS - 2
    assert "skipped 1 unreadable image (row 3), 1 empty caption (row 5)" in report
    expected = first_batches(table, model_and_processor, tmp_path / "tsv")
    for got, want in zip(first_batches(rows, model_and_processor, tmp_path / "hf"), expected):
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_a_stream_reads_the_rows_in_order_and_splits_them_across_processes(forms):
    source = str(forms / "hub")
    stream = load_source(source, split="train", config="ko", streaming=True, option="--train_data", split_option="--split")
    whole = StreamedCaptions(stream, source=source)
    texts = [sample["text"] for sample in whole]
    assert texts == [f"<image>빨간색 네모 {row}<|endofchunk|>" for row in range(ROWS) if row not in (3, 5)]
    assert whole.skipped == {"unreadable image": 1, "empty caption": 1} and whole.skipped.rows["unreadable image"] == [3]
    parts = []
    for rank in range(2):
        part = split_dataset_by_node(stream, rank=rank, world_size=2)
        parts.append([sample["text"] for sample in StreamedCaptions(part, source=source)])
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(texts)


def test_a_stream_continues_from_a_saved_state_and_starts_afresh_on_the_next_pass(forms, tmp_path):
    source = str(forms / "captions.parquet")
    stream = load_source(source, split="train", streaming=True, option="--train_data", split_option="--split")
    first = StreamedCaptions(stream, source=source)
    seen = []
    for sample in first:
        seen.append(sample["text"])
        if len(seen) == 7:
            (tmp_path / "stream-state-rank0.json").write_text(json.dumps(sample["stream_state"]))
            break
    rest = StreamedCaptions(load_source(source, split="train", streaming=True, option="--train_data", split_option="--split"), source=source)
    rest.resume(tmp_path, rank=0)
    after = [sample["text"] for sample in rest]
    assert seen + after == [sample["text"] for sample in StreamedCaptions(stream, source=source)]
    assert len([sample["text"] for sample in rest]) == ROWS - 2  # the next pass is whole again
    with pytest.raises(ValueError, match="no stream position for this process"):
        rest.resume(tmp_path, rank=1)


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing column", ["--text_column sentence:", "has no such column; its columns: image, caption"]),
        ("no usual column", ["has no image column (image / img / image_path / file_name); its columns: photo, caption", "--image_column"]),
        ("urls", ["--image_column image of", "holds URLs (row 0: https://example.com/0.jpg)", "downloads nothing"]),
        ("missing split", ["has no split 'test'; its splits: train, validation (choose with --split)"]),
        ("every row bad", ["--train_data", "no usable rows (skipped: 2 unreadable image (rows 0, 1))"]),
        ("caption lists", ["--text_column caption of", "holds lists of captions (row 0)"]),
        ("streaming a table", ["--streaming reads a Hugging Face dataset given as --train_data"]),
        ("streaming without max_steps", ["A stream has no length to count epochs by: give --max_steps"]),
    ],
)
def test_bad_data_is_one_line_naming_the_problem(case, fragments, forms, backbones, tmp_path, capsys):
    source, extra = forms / "captions.parquet", []
    if case == "missing column":
        extra = ["--text_column", "sentence"]
    elif case == "no usual column":
        source = tmp_path / "photo.parquet"
        datasets.Dataset.from_dict({"photo": ["a.png"], "caption": ["x"]}).to_parquet(str(source))
    elif case == "urls":
        source = tmp_path / "urls.parquet"
        datasets.Dataset.from_dict({"image": [f"https://example.com/{i}.jpg" for i in range(2)], "caption": ["x", "y"]}).to_parquet(str(source))
    elif case == "missing split":
        source, extra = forms / "hub", ["--config", "ko", "--split", "test"]
    elif case == "every row bad":
        source = tmp_path / "bad"
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        cells = [{"bytes": b"not an image", "path": None}] * 2
        datasets.Dataset.from_dict({"image": cells, "caption": ["x", "y"]}, features=features).save_to_disk(str(source))
    elif case == "caption lists":
        source = tmp_path / "lists.parquet"
        datasets.Dataset.from_dict({"image": ["a.png"], "caption": [["x", "y"]]}).to_parquet(str(source))
    elif case == "streaming a table":
        source, extra = forms / "captions.tsv", ["--streaming"]
    elif case == "streaming without max_steps":
        extra = ["--streaming"]
    out = tmp_path / "run"
    arguments = ["--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"], "--output_dir", out, "--use_cpu"]
    result = in_process(capsys, "train", *arguments, "--train_data", source, *extra)
    result.stderr = result.stderr.strip().splitlines()[-1] + "\n"  # after datasets' own progress bars
    assert_one_line_error(result, "train", *fragments)
    assert not out.exists()


def test_without_the_datasets_package_one_line_says_to_install_it(forms, backbones, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails, as where it is not installed
    result = in_process(
        capsys, "train", "--vision_model", backbones["vision"], "--language_model", backbones["gpt_neox"],
        "--output_dir", tmp_path / "run", "--train_data", forms / "captions.parquet",
    )  # fmt: skip
    assert_one_line_error(result, "train", "need the datasets package: pip install datasets")


KILLABLE = textwrap.dedent(
    """
    import json, os, signal, sys
    from transformers import TrainerCallback, TrainingArguments
    from flaminko import training
    from flaminko.data import FlaminkoCollator
    from flaminko.training import DataArguments, ModelArguments, train

    vision, language, source, out, resume, kill_at = sys.argv[1:7]

    # Each batch's captions as it is read from the stream, and as it is trained.
    collate = FlaminkoCollator.__call__
    def collate_and_name(self, samples):
        batch = collate(self, samples)
        batch["captions"] = [sample["text"] for sample in samples]
        with open(f"{out}/read-by-resume-{resume}.jsonl", "a") as log:
            log.write(json.dumps(batch["captions"], ensure_ascii=False) + "\\n")
        return batch
    FlaminkoCollator.__call__ = collate_and_name
    step = training.FlaminkoTrainer.training_step
    def logged_step(self, model, inputs, num_items_in_batch=None):
        with open(f"{out}/trained-by-resume-{resume}.jsonl", "a") as log:
            log.write(json.dumps(inputs.pop("captions"), ensure_ascii=False) + "\\n")
        return step(self, model, inputs, num_items_in_batch)
    training.FlaminkoTrainer.training_step = logged_step

    class KillAt(TrainerCallback):  # a SIGKILL as from outside, at the end of a step after checkpoint-2
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    init = training.FlaminkoTrainer.__init__
    def with_kill(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(KillAt())
    training.FlaminkoTrainer.__init__ = with_kill
    train(
        ModelArguments(vision_model=vision, language_model=language),
        DataArguments(train_data=source, streaming=True),
        TrainingArguments(output_dir=out, max_steps=5, per_device_train_batch_size=4, learning_rate=5e-3, save_strategy="steps",
                          save_steps=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                          resume_from_checkpoint=True if resume == "yes" else None),
    )
    """
)


def test_a_streamed_run_killed_and_resumed_reads_on_from_its_checkpoint(backbones, forms, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(KILLABLE)
    environment = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}

    def command(out, resume, kill_at=0):
        source = forms / "captions.parquet"
        return [sys.executable, str(script), str(backbones["vision"]), str(backbones["gpt_neox"]), str(source), str(out), resume, str(kill_at)]

    def trained(out, resume, log="trained"):
        return [json.loads(line) for line in (out / f"{log}-by-resume-{resume}.jsonl").read_text().splitlines()]

    whole = subprocess.run(command(tmp_path / "whole", "no"), capture_output=True, text=True, timeout=600, env=environment)
    assert whole.returncode == 0, whole.stderr[-3000:]
    batches = trained(tmp_path / "whole", "no")
    captions = [caption for batch in batches for caption in batch]
    assert len(batches) == 5 and len(set(captions)) == len(captions) == 20  # one pass: every row once

    killed = tmp_path / "killed"
    job = subprocess.run(command(killed, "no", kill_at=3), capture_output=True, text=True, timeout=600, env=environment)
    assert job.returncode == -signal.SIGKILL, job.stderr[-3000:]
    assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2"] and not (killed / "final").exists()
    assert (killed / "checkpoint-2" / "stream-state-rank0.json").is_file()
    resumed = subprocess.run(command(killed, "yes"), capture_output=True, text=True, timeout=600, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = trained(killed, "no")[:2], trained(killed, "yes")
    assert before + after == batches  # the steps before checkpoint-2, then on from it: no example twice
    assert trained(killed, "yes", log="read")[0] == batches[2]  # the stream was not read again from its start
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
