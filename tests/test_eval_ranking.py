"""model.score / score_candidates: one batched forward equals per-candidate forward passes; retrieval; RICES."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import noise_image
from flaminko.evaluation.ranking import candidate_batch, rank_images, score_candidates
from flaminko.evaluation.rices import RICES, image_features, nearest


def candidate_log_likelihood(model, processor, prompt, images, candidate):
    """A plain forward over prompt + candidate, unpadded, and the candidate tokens' log-probabilities."""
    prompt_inputs = processor(text=[prompt], images=[images] if images else None)
    candidate_ids = processor.tokenizer(candidate, add_special_tokens=False)["input_ids"]
    input_ids = torch.cat([prompt_inputs["input_ids"], torch.tensor([candidate_ids])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=prompt_inputs.get("pixel_values")).logits[0]
    log_probs = logits[:-1].log_softmax(-1)
    start = prompt_inputs["input_ids"].shape[1] - 1
    return sum(log_probs[start + k, token].item() for k, token in enumerate(candidate_ids)), len(candidate_ids)


def test_scores_equal_per_candidate_forward_passes(model_and_processor):
    model, processor = model_and_processor
    prompts = ["<image>Output:", "Question: colour? <image>Short answer:", "no image here:"]
    images = [[noise_image(0)], [noise_image(1)], []]
    candidates = ["red", "a blue square", "the"]
    for normalize in (False, True):
        scores = score_candidates(model, processor, prompts, images, candidates, length_normalize=normalize)
        assert scores.shape == (3, 3)
        for p, (prompt, prompt_images) in enumerate(zip(prompts, images)):
            for c, candidate in enumerate(candidates):
                total, length = candidate_log_likelihood(model, processor, prompt, prompt_images, candidate)
                assert scores[p, c].item() == pytest.approx(total / length if normalize else total, abs=1e-5)


def test_candidates_share_one_image_encoding(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    seen = []
    original = model.vision_model.forward
    monkeypatch.setattr(
        model.vision_model, "forward", lambda *a, **k: seen.append(k["pixel_values"].shape[0]) or original(*a, **k)
    )
    batch = candidate_batch(
        processor, ["<image>Output:"] * 2, [[noise_image(0)], [noise_image(1)]], ["a", "b", "c", "d"]
    )
    assert batch["input_ids"].shape[0] == 8 and batch["pixel_values"].shape[0] == 2
    score_candidates(
        model, processor, ["<image>Output:"] * 2, [[noise_image(0)], [noise_image(1)]], ["a", "b", "c", "d"]
    )
    assert seen == [2]  # two images, once each, for eight rows


def test_score_rejects_bad_input(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="no candidate texts"):
        score_candidates(model, processor, ["<image>"], [[noise_image(0)]], [])
    ids = torch.ones(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="groups of 2"):
        model.score(ids, ids, candidates_per_prompt=2)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model.score(ids, ids[:, :2])


def test_retrieval_ranks_catalogue_items_by_caption_likelihood(model_and_processor):
    model, processor = model_and_processor
    catalogue = [noise_image(seed) for seed in range(5)]
    ranking = rank_images(model, processor, catalogue, "a red dress", prompt="<image>Output:", batch_size=2)
    assert sorted(index for index, _ in ranking) == list(range(5))
    assert [score for _, score in ranking] == sorted((score for _, score in ranking), reverse=True)
    for index, score in ranking:
        total, length = candidate_log_likelihood(model, processor, "<image>Output:", [catalogue[index]], "a red dress")
        assert score == pytest.approx(total / length, abs=1e-5)


def test_rices_retrieves_planted_near_duplicates(model_and_processor, tmp_path):
    model, processor = model_and_processor
    support = []
    for seed in range(8):
        path = tmp_path / f"support{seed}.png"
        noise_image(seed).save(path)
        support.append({"id": seed, "image": str(path)})
    # Queries: near-duplicates of support images 5 and 2 (a few pixels changed).
    queries = []
    for seed in (5, 2):
        image = noise_image(seed)
        image.putpixel((0, 0), (0, 0, 0))
        queries.append(image)
    finder = RICES(model, processor, support, cache_dir=tmp_path / "cache")
    found = finder.find(queries, 3)
    assert [row[-1] for row in found] == [5, 2]  # the most similar last
    assert all(len(set(row)) == 3 for row in found)
    # The cache is written, and read back instead of recomputing.
    assert finder.cache_file.is_file()
    cached = RICES(model, processor, support, cache_dir=tmp_path / "cache")
    assert torch.equal(cached.features, finder.features)


def test_rices_order_equals_open_flamingo_rices(model_and_processor, monkeypatch):
    """OpenFlamingo's RICES.find (open_clip stubbed out) on the same features picks the same, in the same order."""
    model, processor = model_and_processor
    monkeypatch.setitem(sys.modules, "open_clip", types.ModuleType("open_clip"))
    utils = types.ModuleType("utils")
    utils.custom_collate_fn = None
    monkeypatch.setitem(sys.modules, "utils", utils)
    path = Path(importlib.util.find_spec("open_flamingo").submodule_search_locations[0]) / "eval" / "rices.py"
    spec = importlib.util.spec_from_file_location("open_flamingo_eval_rices", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    support_images = [noise_image(seed) for seed in range(10)]
    query_images = [noise_image(seed) for seed in (20, 21, 22)]
    support_features = image_features(model, processor, support_images)
    query_features = image_features(model, processor, query_images)

    class Encoder:
        def eval(self):
            return self

        def encode_image(self, inputs):
            return query_features.clone()

    theirs = object.__new__(module.RICES)
    theirs.dataset, theirs.features, theirs.model = list(range(10)), support_features, Encoder()
    theirs.image_processor, theirs.device = (lambda image: torch.zeros(1)), "cpu"
    assert nearest(query_features, support_features, 4) == theirs.find(query_images, 4)
