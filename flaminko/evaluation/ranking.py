"""Ranking candidate texts by their log-likelihood: classification over class names, and
FROMAGe-style retrieval (catalogue items ranked by how likely a caption is under each item's image).
Both go through `FlaminkoForConditionalGeneration.score`: one forward per batch, the images encoded
and their media keys/values projected once per prompt, however many candidates it has."""

import torch


def candidate_batch(processor, prompts: list[str], images: list[list], candidates: list[str]) -> dict:
    """Model inputs for every prompt followed by every candidate: rows prompt-major, right-padded,
    labels on the candidate tokens only; pixel_values keep one row per prompt."""
    if not candidates:
        raise ValueError("There are no candidate texts to score")
    tokenizer = processor.tokenizer
    encoding = processor(text=prompts, images=images or None)
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(encoding["input_ids"], encoding["attention_mask"])]
    candidate_ids = tokenizer(list(candidates), add_special_tokens=False)["input_ids"]
    empty = [text for text, ids in zip(candidates, candidate_ids) if not ids]
    if empty:
        raise ValueError(f"Candidate texts {empty[:5]} are empty once tokenized")
    rows = [
        (prompt + candidate, [-100] * len(prompt) + candidate) for prompt in prompt_ids for candidate in candidate_ids
    ]
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in rows]),
        "candidates_per_prompt": len(candidates),
    }
    if "pixel_values" in encoding:
        batch["pixel_values"] = encoding["pixel_values"]
    return batch


def score_candidates(
    model, processor, prompts: list[str], images: list[list], candidates: list[str], *, length_normalize: bool = False
) -> torch.Tensor:
    """(prompts, candidates) log-likelihoods of each candidate text after each prompt (with its images)."""
    batch = candidate_batch(processor, prompts, images, candidates)
    tensors = {key: value.to(model.device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    scores = model.score(
        **tensors, candidates_per_prompt=batch["candidates_per_prompt"], length_normalize=length_normalize
    )
    return scores.view(len(prompts), len(candidates)).cpu()


def rank_images(
    model,
    processor,
    images: list,
    text: str,
    *,
    prompt: str = "<image>",
    length_normalize: bool = True,
    batch_size: int = 16,
) -> list[tuple[int, float]]:
    """Retrieval: (image index, log-likelihood of `text` after `prompt` with that image), best first."""
    if prompt.count("<image>") != 1:
        raise ValueError(f"The retrieval prompt must hold exactly one <image>, got {prompt!r}")
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        scores += score_candidates(
            model,
            processor,
            [prompt] * len(chunk),
            [[image] for image in chunk],
            [text],
            length_normalize=length_normalize,
        )[:, 0].tolist()
    return sorted(enumerate(scores), key=lambda pair: -pair[1])
