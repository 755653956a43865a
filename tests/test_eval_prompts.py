"""Our prompts equal the strings OpenFlamingo's evaluate.py builds for the same demonstrations.

evaluate.py cannot be imported here (open_clip, torchvision, nltk), so its prompt-building loops
are taken out of its source with `ast` and run as they are, on the same demonstrations, with the
prompt methods of OpenFlamingo's eval model (eval/models/open_flamingo.py, which its wheel does
not ship)."""

import ast
import importlib.util
from pathlib import Path

import pytest

from flaminko.evaluation.prompts import PROMPT_FORMATS, build_prompt, postprocess

EVALUATE = Path(importlib.util.find_spec("open_flamingo").submodule_search_locations[0]) / "eval" / "evaluate.py"


class OpenFlamingoPrompts:
    def get_vqa_prompt(self, question, answer=None):
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{'<|endofchunk|>' if answer is not None else ''}"

    def get_caption_prompt(self, caption=None):
        return (
            f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"
        )

    def get_imagenet_prompt(self, label=None):
        return f"<image>Output:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"

    def get_hateful_memes_prompt(self, text, label=None):
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"


def prompt_loop(function_name: str) -> ast.Module:
    """The `for i in range(len(batch["image"]))` loop of one evaluate_* function, which builds the prompts."""
    tree = ast.parse(EVALUATE.read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function_name)
    loop = next(
        node
        for node in ast.walk(function)
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "i"
    )
    return ast.Module(body=[loop], type_ignores=[])


def open_flamingo_prompts(function_name, namespace):
    namespace = {"eval_model": OpenFlamingoPrompts(), "batch_images": [], "batch_text": [], **namespace}
    exec(compile(prompt_loop(function_name), str(EVALUATE), "exec"), namespace)
    return namespace["batch_text"], namespace["batch_images"]


CAPTIONS = [{"id": n, "image": f"img{n}", "captions": [f" caption {n} ", "other"]} for n in range(5)]
QUESTIONS = [
    {"id": n, "image": f"img{n}", "question": f"What is {n}?", "answers": [f"answer {n}", "x"]} for n in range(5)
]
CLASSES = [{"id": n, "image": f"img{n}", "class_name": f"class {n}"} for n in range(5)]
MEMES = [{"id": n, "image": f"img{n}", "class_name": ["no", "yes"][n % 2], "ocr": f"text {n}"} for n in range(5)]


@pytest.mark.parametrize("shots", [0, 2, 4])
def test_captioning_and_vqa_prompts_equal_open_flamingo(shots):
    effective = shots or 2  # compute_effective_num_shots: 0-shot draws 2 text-only demonstrations
    for task, samples, function in (
        ("captioning", CAPTIONS, "evaluate_captioning"),
        ("vqa", QUESTIONS, "evaluate_vqa"),
    ):
        query, demos = samples[0], samples[1 : 1 + effective]
        their_demos = [
            {
                "caption": d.get("captions", [""])[0],
                "question": d.get("question"),
                "answers": d.get("answers"),
                "image": d["image"],
            }
            for d in demos
        ]
        batch = {"image": [query["image"]], "question": [query.get("question")]}
        texts, images = open_flamingo_prompts(
            function, {"batch": batch, "batch_demo_samples": [their_demos], "num_shots": shots}
        )
        ours = build_prompt(task, query, demos, PROMPT_FORMATS["open_flamingo"], shots=shots)
        assert ours == (texts[0], images[0]), task


@pytest.mark.parametrize("shots", [0, 3])
def test_classification_prompts_equal_open_flamingo(shots):
    effective = shots or 2
    for samples, prompt_fn in (
        (CLASSES, lambda x: OpenFlamingoPrompts().get_imagenet_prompt(label=x["class_name"])),
        (MEMES, lambda x: OpenFlamingoPrompts().get_hateful_memes_prompt(text=x["ocr"], label=x["class_name"])),
    ):
        query, demos = samples[0], samples[1 : 1 + effective]
        batch = {"image": [query["image"]], "ocr": [query.get("ocr")]}
        namespace = {
            "batch": batch, "batch_demo_samples": [list(demos)], "num_shots": shots, "effective_num_shots": effective,
            "use_prompt_ensembling": False, "prompt_fn": prompt_fn, "random": None,
        }  # fmt: skip
        texts, images = open_flamingo_prompts("evaluate_classification", namespace)
        ours = build_prompt("classification", query, demos, PROMPT_FORMATS["open_flamingo"], shots=shots)
        assert ours[0] == texts[0]
        # At 0 shots OpenFlamingo's classification still passes the two demonstrations' images (its
        # check is on effective_num_shots) though their <image> tags are gone, so its query's <image>
        # would see the first demonstration's image; we pass the query's only, as its captioning and VQA do.
        assert ours[1] == (images[0] if shots else [query["image"]])


def test_generations_are_cut_as_open_flamingo_cuts_them():
    import importlib.util as util

    spec = util.spec_from_file_location("of_coco_metric", EVALUATE.parent / "coco_metric.py")
    coco_metric = util.module_from_spec(spec)
    spec.loader.exec_module(coco_metric)
    spec = util.spec_from_file_location("of_vqa_metric", EVALUATE.parent / "vqa_metric.py")
    vqa_metric = util.module_from_spec(spec)
    spec.loader.exec_module(vqa_metric)
    template = PROMPT_FORMATS["open_flamingo"]
    for text in ['a "dog" on grass Output: a cat', " a man\n", "Output:"]:
        assert (
            postprocess("captioning", text, template)
            == coco_metric.postprocess_captioning_generation(text).replace('"', "").strip()
        )
    for text in ["yes, it is", "2 Question: what", "red Short answer", "blue Answer: x"]:
        assert postprocess("vqa", text, template) == vqa_metric.postprocess_vqa_generation(text).strip()
