"""Metrics against OpenFlamingo's own evaluation code, the official VQA definition and pycocoevalcap."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaminko.evaluation.metrics import (
    captioning_scores,
    choose_tokenizer,
    classification_scores,
    korean_tokenize,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_scores,
)

OPEN_FLAMINGO_EVAL = Path(importlib.util.find_spec("open_flamingo").submodule_search_locations[0]) / "eval"


def load_open_flamingo_eval(name):
    """One file of open_flamingo/eval by path: the package __init__ would import open_clip."""
    spec = importlib.util.spec_from_file_location(f"open_flamingo_eval_{name}", OPEN_FLAMINGO_EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words
        ("the dog", "dog"),  # articles
        ("A  Cat.", "cat"),  # case, spaces, a final period
        ("dont", "don't"),  # contractions
        ("yes!", "yes"),
        ("red,white", "red white"),  # a mark inside a word becomes a space
        ("red, white", "red white"),  # next to a space it goes
        ("1,000", "1000"),  # digit,digit: every mark goes
        ("3.5", "3.5"),  # a period before a digit stays
        ("t-shirt", "t shirt"),
        ("  none\n", "0"),
    ],
)
def test_vqa_normalisation_cases_of_the_official_definition(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_hand_computed():
    # 10 answers, 3 "2": each leave-one-out subset holds 2 or 3 matches -> (7 * 1 + 3 * 2/3) / 10.
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx((7 * 1 + 3 * (2 / 3)) / 10)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("four", answers) == 0.0
    # One match: 9 subsets keep it (1/3), the one without it scores 0.
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("x", [])


ANSWER_WORDS = ["yes", "no", "2", "two", "the dog", "dog", "red, white", "t-shirt", "dont", "don't", "a cat.", "1,000"]


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(ANSWER_WORDS), st.lists(st.sampled_from(ANSWER_WORDS), min_size=10, max_size=10)),
        min_size=1,
        max_size=6,
    )
)
def test_vqa_accuracy_equals_open_flamingo_vqa_metric(tmp_path_factory, questions):
    folder = tmp_path_factory.mktemp("vqa")
    vqa_metric = load_open_flamingo_eval("vqa_metric")
    annotations = {
        "annotations": [
            {
                "question_id": qid,
                "image_id": qid,
                "question_type": "what",
                "answer_type": "other",
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            }
            for qid, (_, answers) in enumerate(questions)
        ]
    }
    question_file = {
        "questions": [{"question_id": qid, "image_id": qid, "question": "?"} for qid in range(len(questions))],
        **{key: "" for key in ("info", "task_type", "data_type", "data_subtype", "license")},
    }
    results = [{"question_id": qid, "answer": prediction} for qid, (prediction, _) in enumerate(questions)]
    for name, content in (("a.json", annotations), ("q.json", question_file), ("r.json", results)):
        (folder / name).write_text(json.dumps(content))
    theirs = vqa_metric.compute_vqa_accuracy(str(folder / "r.json"), str(folder / "q.json"), str(folder / "a.json"))
    ours = vqa_scores(
        {qid: p for qid, (p, _) in enumerate(questions)}, {qid: a for qid, (_, a) in enumerate(questions)}
    )
    # Theirs is rounded to 2 decimals.
    assert ours["VQA accuracy"] == pytest.approx(theirs, abs=0.005 + 1e-9)


REFERENCES = {
    1: [
        "A man riding a horse on a beach.",
        "A person rides a brown horse near the sea.",
        "Man on horseback at the shore.",
    ],
    2: ["Two dogs playing with a red ball.", "A pair of dogs chase a ball in the grass.", "Dogs play fetch outside."],
    3: [
        "A plate of food with broccoli and rice.",
        "Rice and vegetables on a white plate.",
        "A healthy meal on a plate.",
    ],
}
PREDICTIONS = {
    1: "a man riding a horse on the beach",
    2: "two dogs playing with a ball",
    3: "a plate of rice and broccoli",
}


@pytest.mark.skipif(shutil.which("java") is None, reason="the official PTB tokenizer needs java on the PATH")
def test_english_captions_score_as_open_flamingo_compute_cider(tmp_path, monkeypatch):
    """The official pipeline: OpenFlamingo's coco_metric.compute_cider (pycocotools + COCOEvalCap,
    Java PTB tokenizer); METEOR and SPICE are stubbed (SPICE downloads CoreNLP, offline here)."""
    import pycocoevalcap.eval

    class Skipped:
        def method(self):
            return "skipped"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

    monkeypatch.setattr(pycocoevalcap.eval, "Meteor", Skipped)
    monkeypatch.setattr(pycocoevalcap.eval, "Spice", Skipped)
    coco_metric = load_open_flamingo_eval("coco_metric")
    annotations = {
        "images": [{"id": key} for key in REFERENCES],
        "annotations": [
            {"image_id": key, "id": 10 * key + i, "caption": caption}
            for key, captions in REFERENCES.items()
            for i, caption in enumerate(captions)
        ],
        "type": "captions",
        "info": {},
        "licenses": [],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": k, "caption": c} for k, c in PREDICTIONS.items()]))
    theirs = coco_metric.compute_cider(str(tmp_path / "results.json"), str(tmp_path / "annotations.json"))
    ours = captioning_scores(PREDICTIONS, REFERENCES)
    assert ours["tokenizer"] == "ptb"
    assert ours["CIDEr"] == pytest.approx(100 * theirs["CIDEr"], rel=1e-12)
    assert ours["BLEU-4"] == pytest.approx(100 * theirs["Bleu_4"], rel=1e-12)
    assert ours["CIDEr"] > 0


def test_korean_captions_use_the_python_tokenizer_and_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    references = {
        "a": ["빨간색 원이 있다.", "빨간 원"],
        "b": ["파란색 네모 2개", "파란 네모"],
        "c": ["노란색 세모", "노란 삼각형"],
    }
    predictions = {"a": "빨간색 원", "b": "파란색 네모 2개", "c": "초록색 세모"}
    scores = captioning_scores(predictions, references)
    assert scores["tokenizer"] == "korean"
    gts = {k: [korean_tokenize(c) for c in v] for k, v in references.items()}
    res = {k: [korean_tokenize(v)] for k, v in predictions.items()}
    assert scores["CIDEr"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert scores["BLEU-4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert scores["exact match"] == pytest.approx(100 / 3)


def test_korean_tokenizer_splits_hangul_latin_digits_and_punctuation():
    assert korean_tokenize("빨간색 원이 2개, Cat고양이!") == "빨간색 원이 2 개 , cat 고양이 !"


def test_tokenizer_choice(monkeypatch):
    assert choose_tokenizer([["빨간색 원"]], "auto") == "korean"
    with pytest.raises(ValueError, match="Korean"):
        choose_tokenizer([["빨간색 원"]], "ptb")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert choose_tokenizer([["a red circle"]], "auto") == "korean"
    with pytest.raises(ValueError, match="java was not found"):
        choose_tokenizer([["a red circle"]], "ptb")


def test_classification_top_k_and_roc_auc():
    from sklearn.metrics import roc_auc_score

    records = [
        {"label": "yes", "ranking": ["yes", "no"], "probabilities": {"yes": 0.9, "no": 0.1}},
        {"label": "no", "ranking": ["yes", "no"], "probabilities": {"yes": 0.6, "no": 0.4}},
        {"label": "no", "ranking": ["no", "yes"], "probabilities": {"yes": 0.2, "no": 0.8}},
        {"label": "yes", "ranking": ["no", "yes"], "probabilities": {"yes": 0.3, "no": 0.7}},
    ]
    scores = classification_scores(records, ["no", "yes"])
    assert scores["top-1 accuracy"] == 50.0 and scores["top-5 accuracy"] == 100.0
    assert scores["ROC AUC"] == pytest.approx(100 * roc_auc_score([1, 0, 0, 1], [0.9, 0.6, 0.2, 0.3]))
    assert scores["ROC AUC"] == pytest.approx(75.0)


@pytest.mark.parametrize(
    "generated, stemmed",
    [
        ("riding", "ride"),  # OK-VQA's table of manual matches
        ("surfing Question: what", "surf"),  # a verb in -ing, after the cut at "Question"
        ("two horses", "two horse"),  # a plural noun
        ("it's raining", "it 's rain"),  # nltk's word tokens, joined by spaces
        ("ceiling", "ceiling"),  # not a verb: left as it is
        ("bus, car", "bus"),  # a singular noun in -s, after the cut at ", "
    ],
)
def test_ok_vqa_predictions_are_stemmed_as_openflamingo_stems_them(generated, stemmed):
    from flaminko.evaluation.ok_vqa import stem_ok_vqa_answer
    from flaminko.evaluation.prompts import PROMPT_FORMATS, postprocess

    assert stem_ok_vqa_answer(postprocess("vqa", generated, PROMPT_FORMATS["open_flamingo"])) == stemmed


def test_ok_vqa_stemming_follows_openflamingo_rules_given_the_same_word_tools(monkeypatch):
    """OpenFlamingo's postprocess_ok_vqa_generation itself, its nltk data (not on PyPI) stood in for by
    the tools Flaminko uses: the manual table, the order of the rules and the joining are OpenFlamingo's."""
    import nltk
    from nltk.tokenize import NLTKWordTokenizer

    from flaminko.evaluation import ok_vqa
    from flaminko.evaluation.prompts import PROMPT_FORMATS, postprocess

    _, lemminflect, _ = ok_vqa.stemming_tools()
    tokenizer = NLTKWordTokenizer()
    monkeypatch.setattr(nltk.tokenize, "word_tokenize", tokenizer.tokenize)
    monkeypatch.setattr(
        nltk, "pos_tag", lambda words: [(w, "NNS" if ok_vqa._is_plural_noun(w, lemminflect) else "NN") for w in words]
    )
    reference = load_open_flamingo_eval("ok_vqa_utils")
    monkeypatch.setattr(
        reference.stemmer._wordnet_lemmatizer,
        "lemmatize",
        lambda word, pos: next(iter(lemminflect.getLemma(word, upos="VERB", lemmatize_oov=False)), word),
    )
    assert ok_vqa.MANUAL_MATCHES == reference._MANUAL_MATCHES
    answers = [*reference._MANUAL_MATCHES, "two horses riding", "kites and boats", "men's shoes", "he's skiing",
               "glasses", "the dogs are running Question: why", "red, white", "tennis rackets Answer:"]  # fmt: skip
    for answer in answers:
        ours = ok_vqa.stem_ok_vqa_answer(postprocess("vqa", answer, PROMPT_FORMATS["open_flamingo"]))
        assert ours == reference.postprocess_ok_vqa_generation(answer), answer
