"""`flaminko eval`: few-shot captioning, VQA and classification, OpenFlamingo's protocol.

For each shot count and trial: every query gets its demonstrations (drawn at random from the
support set, seeded by trial and query so that a resumed or multi-process run draws the same, or
chosen by RICES), a prompt (`prompts.build_prompt`), and a generated answer (captioning, VQA) or a
ranking of the class names by log-likelihood (classification). Predictions are appended to a JSONL
file as they come, so an interrupted run resumes where it stopped; under `accelerate launch` or
torchrun the queries are split between the processes and the predictions gathered once, on the
main process, which scores them and writes `results.json`.
"""

import hashlib
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..hf_datasets import is_datasets_source, openable
from .datasets import TASKS, load_class_names, load_task_data
from .metrics import captioning_scores, classification_scores, vqa_scores
from .ok_vqa import STEMMING, stem_ok_vqa_answer, stemming_tools
from .prompts import (
    DECODING,
    LONG_ANSWER_LAYOUTS,
    LONG_ANSWER_MAX_NEW_TOKENS,
    PROMPT_FORMATS,
    ZERO_SHOT_TEXT_DEMONSTRATIONS,
    build_prompt,
    postprocess,
)
from .ranking import score_candidates
from .rices import RICES

DTYPES = ("auto", "float32", "bfloat16", "float16")
PROVENANCE_FILE = "provenance.json"


def load_model(model, dtype: str = "auto", device=None):
    """A Flaminko folder or Hub id (checked and loaded as `flaminko caption` loads it), or a
    (model, processor) pair already loaded; in eval mode, on the device."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype is one of {', '.join(DTYPES)}; got {dtype!r}")
    if isinstance(model, (str, Path)):
        from ..inference import load

        return load(str(model), device=None if device is None else str(device), dtype=dtype)
    model, processor = model
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def _read_records(paths, *, report: bool) -> dict:
    """The prediction records of the files, by id. A last line without its newline is a write cut short
    (a kill mid-write): it is cut off the file, with a note when `report`, and its query predicted again.
    Any other line that is not a record is damage this run cannot repair: an error naming the file."""
    records = {}
    for path in paths:
        if not path.is_file():
            continue
        content = path.read_bytes()
        complete, _, torn = content.rpartition(b"\n")
        if torn.strip():
            with path.open("r+b") as handle:
                handle.truncate(len(content) - len(torn))
            if report:
                print(
                    f"note: {str(path)!r} ended in a torn line (an interrupted write): dropped, its query is predicted again",
                    file=sys.stderr,
                )
        for number, line in enumerate(complete.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[json.dumps(record["id"])] = record
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(
                    f"{str(path)!r} line {number} is not a prediction record ({type(error).__name__}: {error}): "
                    "delete the file to predict its queries again"
                ) from None
    return records


def _data_identity(path) -> dict | None:
    """A data file by its resolved path and the hash of its contents: the same path rewritten is another file.
    A folder (a Hugging Face dataset's) by its files' names, sizes and modification times; a Hub dataset by
    its id alone (the revision read is not recorded)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*")) if f.is_file()]
        return {"path": str(path.resolve()), "version": hashlib.sha256(json.dumps(stats).encode()).hexdigest()}
    if not path.exists():
        return {"path": str(path)}
    with path.open("rb") as handle:
        return {"path": str(path.resolve()), "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def _model_identity(model) -> dict:
    """The model by name and version: a local folder's files by name, size and modification time (weights
    saved again are another model), a Hub model by the commit it was loaded from."""
    name = str(getattr(model, "name_or_path", "") or "")
    folder = Path(name)
    if name and folder.is_dir():
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]
        return {"path": str(folder.resolve()), "version": hashlib.sha256(json.dumps(stats).encode()).hexdigest()}
    return {"path": name, "version": getattr(model.config, "_commit_hash", None)}


def _difference(name: str, recorded, current) -> str:
    if isinstance(recorded, dict) and isinstance(current, dict) and "path" in current and recorded.get("path") == current["path"]:
        return f"{name}: {current['path']!r} has changed since"
    shown = [value["path"] if isinstance(value, dict) and "path" in value else value for value in (recorded, current)]
    return f"{name}: was {json.dumps(shown[0], ensure_ascii=False)}, now {json.dumps(shown[1], ensure_ascii=False)}"


def _check_provenance(output_dir: Path, provenance: dict):
    """Predictions already in `output_dir` are resumed only if they came from this very setup (model, data,
    task, prompt, decoding, demonstrations, seed, dtype); anything else is refused, naming what differs."""
    existing = sorted(output_dir.glob("predictions-*.jsonl"))
    if not existing:
        return
    record = output_dir / PROVENANCE_FILE
    advice = "pass another --out, or delete its predictions-*.jsonl to predict again"
    if not record.is_file():
        raise ValueError(
            f"{str(output_dir)!r} holds predictions ({existing[0].name}...) without {PROVENANCE_FILE}, the record of "
            f"what they came from (written by an older Flaminko?): {advice}"
        )
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{str(record)!r} is damaged ({error}): {advice}") from None
    differences = [
        _difference(name, recorded.get(name), value) for name, value in provenance.items() if recorded.get(name) != value
    ]
    if differences:
        raise ValueError(f"{str(output_dir)!r} holds predictions of another run ({'; '.join(differences)}): {advice}")


def _demonstrations(query, support, shots, seed, retrieved):
    """The query's demonstrations: `retrieved` (RICES, support indices) or drawn at random, seeded by
    trial and query so that whichever process or resumed run draws them, they are the same."""
    count = shots if shots > 0 else (ZERO_SHOT_TEXT_DEMONSTRATIONS if support else 0)
    if count == 0:
        return []
    if retrieved is not None:
        return [support[i] for i in retrieved]
    return random.Random(f"{seed}:{json.dumps(query['id'])}").sample(support, count)


def _predict(
    task, model, processor, queries, demonstrations, prompt_format, shots, decoding, class_names, length_normalize
):
    prompts, images = zip(
        *(build_prompt(task, q, demos, prompt_format, shots=shots) for q, demos in zip(queries, demonstrations))
    )
    images = [[openable(image) for image in prompt_images] for prompt_images in images]
    if task == "classification":
        scores = score_candidates(
            model, processor, list(prompts), list(images), class_names, length_normalize=length_normalize
        )
        records = []
        for query, row in zip(queries, scores):
            order = row.argsort(descending=True).tolist()
            probabilities = row.softmax(-1).tolist()
            records.append(
                {
                    "label": query["class_name"],
                    "ranking": [class_names[i] for i in order],
                    "probabilities": {name: p for name, p in zip(class_names, probabilities)},
                }
            )
        return prompts, records
    batch = processor(text=list(prompts), images=list(images), padding_side="left").to(model.device)
    output = model.generate(**batch, do_sample=False, **decoding)
    texts = processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    records = []
    for query, text in zip(queries, texts):
        prediction = postprocess(task, text, prompt_format)
        if query.get("layout") == "ok_vqa":
            prediction = stem_ok_vqa_answer(prediction)
        record = {"prediction": prediction, "generated": text}
        record["references" if task == "captioning" else "answers"] = query[
            "captions" if task == "captioning" else "answers"
        ]
        records.append(record)
    return prompts, records


def _score(task, records, class_names, caption_tokenizer):
    if task == "captioning":
        return captioning_scores(
            {json.dumps(r["id"]): r["prediction"] for r in records},
            {json.dumps(r["id"]): r["references"] for r in records},
            caption_tokenizer,
        )
    if task == "vqa":
        return vqa_scores(
            {json.dumps(r["id"]): r["prediction"] for r in records},
            {json.dumps(r["id"]): r["answers"] for r in records},
        )
    return classification_scores(records, class_names)


def evaluate(
    model,
    *,
    task: str,
    data,
    annotations=None,
    support=None,
    support_annotations=None,
    class_names=None,
    image_root=None,
    support_image_root=None,
    split: str | None = "test",
    support_split: str | None = "train",
    config: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    question_column: str | None = None,
    answers_column: str | None = None,
    label_column: str | None = None,
    shots=(0,),
    trials: int = 1,
    seed: int = 42,
    rices: bool = False,
    rices_cache=None,
    prompt_format: str = "open_flamingo",
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    length_normalize: bool = True,
    caption_tokenizer: str = "auto",
    batch_size: int = 8,
    limit: int | None = None,
    dtype: str = "auto",
    device=None,
    output_dir="flaminko-eval",
    progress: bool = True,
) -> dict | None:
    """Evaluates `model` (a folder, a Hub id, or a (model, processor) pair); returns the results
    (also written to `output_dir/results.json`) on the main process, None on the others."""
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"Unknown prompt format {prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    shots = sorted(set(int(count) for count in shots))
    if any(count < 0 for count in shots) or trials < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError("--shots must be >= 0, and --trials, --batch_size and --limit >= 1")
    if task == "classification":
        if class_names is None:
            raise ValueError("Classification needs the class names (--class_names FILE: one a line, or a JSON list)")
        class_names = load_class_names(class_names)
    columns = {
        "image_column": image_column, "text_column": text_column, "question_column": question_column,
        "answers_column": answers_column, "label_column": label_column,
    }  # fmt: skip
    data_split = split if str(data).endswith(".json") or is_datasets_source(data) else None
    queries = load_task_data(
        task, data, annotations=annotations, class_names=class_names, image_root=image_root, split=data_split, config=config,
        columns=columns,
    )  # fmt: skip
    queries = queries[:limit] if limit else queries
    if queries[0].get("layout") == "ok_vqa":
        stemming_tools()  # missing, it is said now rather than after the model has answered
    support_set = []
    data_support_split = support_split if support is not None and (str(support).endswith(".json") or is_datasets_source(support)) else None
    if support is not None:
        support_set = load_task_data(
            task, support, annotations=support_annotations, class_names=class_names, image_root=support_image_root,
            split=data_support_split, config=config, columns=columns, option="--support",
        )  # fmt: skip
    elif max(shots) > 0:
        raise ValueError(f"{max(shots)} shots need a support set to draw demonstrations from (--support)")
    needed = max(count or ZERO_SHOT_TEXT_DEMONSTRATIONS for count in shots)
    if support_set and needed > len(support_set):
        raise ValueError(
            f"{needed} demonstrations per query (0-shot draws {ZERO_SHOT_TEXT_DEMONSTRATIONS} text-only ones) need "
            f"{needed} support samples; the support set has {len(support_set)}"
        )
    if rices and not support_set:
        raise ValueError("RICES retrieves demonstrations from the support set: pass --support")

    # On CPU (asked for, or no GPU) accelerate joins the torchrun / accelerate processes over gloo.
    state = PartialState(cpu=str(device).startswith("cpu") or not torch.cuda.is_available())
    model, processor = load_model(model, dtype, device or state.device)
    templates = PROMPT_FORMATS[prompt_format]
    decoding = dict(DECODING.get(task, {}))
    if task == "vqa" and queries[0].get("layout") in LONG_ANSWER_LAYOUTS:
        decoding["max_new_tokens"] = LONG_ANSWER_MAX_NEW_TOKENS
    decoding.update(
        {k: v for k, v in {"num_beams": num_beams, "max_new_tokens": max_new_tokens}.items() if v is not None}
    )
    if decoding.get("num_beams") == 1:
        decoding.pop("length_penalty", None)  # a beam-search setting: greedy decoding would warn about it
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    provenance = {
        "task": task,
        "model": _model_identity(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "data": _data_identity(data),
        "annotations": _data_identity(annotations),
        "split": data_split,
        "config": config,
        "columns": {name: column for name, column in columns.items() if column is not None} or None,
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "support": _data_identity(support),
        "support_annotations": _data_identity(support_annotations),
        "support_split": data_support_split,
        "support_image_root": str(Path(support_image_root).resolve()) if support_image_root else None,
        "class_names": class_names,
        "prompt_format": prompt_format,
        "decoding": decoding if task != "classification" else {"length_normalize": length_normalize},
        "demonstrations": "rices" if rices else "random",
        "seed": seed,
    }
    provenance = json.loads(json.dumps(provenance))  # as it reads back from the file
    _check_provenance(output_dir, provenance)
    state.wait_for_everyone()  # every process has checked before the main one writes the record
    if state.is_main_process:
        (output_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, ensure_ascii=False, indent=2), encoding="utf-8")
    finder = None
    if rices:
        with state.main_process_first():  # the main process writes the feature cache; the others read it
            finder = RICES(
                model, processor, support_set, cache_dir=rices_cache, progress=progress and state.is_main_process
            )
    results = {}
    # RICES: each query's `needed` nearest support samples (most similar last), found once for every
    # shot count and trial; a shot count takes the last (most similar) of them.
    ranked = {}
    for count in shots:
        effective = count or ZERO_SHOT_TEXT_DEMONSTRATIONS
        for trial in range(trials):
            run = f"{task}-{count}shot-trial{trial}"
            final = output_dir / f"predictions-{run}.jsonl"
            parts = sorted(output_dir.glob(f"predictions-{run}.rank*.jsonl"))
            done = _read_records([final, *parts], report=state.is_main_process)
            state.wait_for_everyone()  # every process reads the same finished set before any appends
            pending = [q for q in queries if json.dumps(q["id"]) not in done]
            new = []
            with state.split_between_processes(pending) as mine:
                part = output_dir / f"predictions-{run}.rank{state.process_index}.jsonl"
                bar = tqdm(total=len(pending), desc=run, disable=not (progress and state.is_main_process))
                with part.open("a", encoding="utf-8") as sink:
                    for start in range(0, len(mine), batch_size):
                        batch = mine[start : start + batch_size]
                        retrieved = [None] * len(batch)
                        if finder:
                            unranked = [q for q in batch if json.dumps(q["id"]) not in ranked]
                            if unranked:
                                found = finder.find([q["image"] for q in unranked], needed)
                                ranked.update({json.dumps(q["id"]): row for q, row in zip(unranked, found)})
                            retrieved = [ranked[json.dumps(q["id"])][-effective:] for q in batch]
                        demos = [
                            _demonstrations(q, support_set, count, seed + trial, r) for q, r in zip(batch, retrieved)
                        ]
                        prompts, records = _predict(
                            task, model, processor, batch, demos, templates, count, decoding, class_names, length_normalize
                        )  # fmt: skip
                        for query, demo, prompt, record in zip(batch, demos, prompts, records):
                            record = {"id": query["id"], "image": str(query["image"]), **record, "prompt": prompt}
                            record["demonstrations"] = [d["id"] for d in demo]
                            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                            new.append(record)
                        sink.flush()
                        bar.update(len(batch) * state.num_processes)
                bar.close()
            gathered = gather_object(new) if state.num_processes > 1 else new
            if state.is_main_process:
                merged = {**done, **{json.dumps(r["id"]): r for r in gathered}}
                ordered = [merged[json.dumps(q["id"])] for q in queries]
                staged = final.with_suffix(".jsonl.tmp")  # replaced in one step: a kill leaves the old file or the new
                staged.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered), encoding="utf-8")
                staged.replace(final)
                for leftover in output_dir.glob(f"predictions-{run}.rank*.jsonl"):
                    leftover.unlink()
                results.setdefault(count, []).append(_score(task, ordered, class_names, caption_tokenizer))
            state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = {}
    for count, trial_scores in results.items():
        summary[str(count)] = {}
        for metric, value in trial_scores[0].items():
            values = [scores[metric] for scores in trial_scores]
            if isinstance(value, str):
                summary[str(count)][metric] = value
            else:
                summary[str(count)][metric] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.pstdev(values),
                    "trials": values,
                }
    report = {
        "task": task,
        "model": str(getattr(model, "name_or_path", "")),
        "data": str(data),
        "annotations": str(annotations) if annotations else None,
        "support": str(support) if support else None,
        "num_samples": len(queries),
        "shots": shots,
        "trials": trials,
        "seed": seed,
        "demonstrations": "rices" if rices else "random",
        "zero_shot": f"{ZERO_SHOT_TEXT_DEMONSTRATIONS} text-only demonstrations"
        if support_set
        else "no demonstrations",
        "prompt_format": prompt_format,
        "decoding": provenance["decoding"],
        **({"answer_stemming": STEMMING} if queries[0].get("layout") == "ok_vqa" else {}),
        "metrics": summary,
        "processes": state.num_processes,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 1),
    }
    (output_dir / "results.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return report
