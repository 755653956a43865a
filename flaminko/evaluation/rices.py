"""RICES: Retrieval-based In-Context Example Selection (Yang et al., 2022), as OpenFlamingo's
`--rices` does it: the support images most similar to the query image by cosine similarity of CLIP
image features, the most similar demonstration placed last. The features are the model's own
vision tower's (its pooled output: the post-layernorm CLS token that CLIP projects), not a second
CLIP, and the support set's are cached to disk, keyed by the model and the support images."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..hf_datasets import openable
from ..processing_flaminko import load_image


@torch.no_grad()
def image_features(model, processor, images: list, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """(N, D) L2-normalised pooled features of the model's vision tower."""
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc="RICES features", disable=not progress):
        chunk = [load_image(openable(image)) for image in images[start : start + batch_size]]
        pixels = processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
        pooled = model.vision_model(pixel_values=pixels.to(model.device, model.vision_model.dtype)).pooler_output
        features.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(features)


def nearest(query_features: torch.Tensor, support_features: torch.Tensor, k: int) -> list[list[int]]:
    """Indices of the k most similar support items per query, the most similar last."""
    similarity = query_features @ support_features.T
    top = similarity.topk(min(k, support_features.shape[0]), dim=-1).indices
    return [list(reversed(row)) for row in top.tolist()]


class RICES:
    def __init__(self, model, processor, support: list[dict], *, cache_dir=None, batch_size: int = 32, progress=False):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        images = [sample["image"] for sample in support]
        cache = None
        if cache_dir is not None:
            key = json.dumps([str(model.name_or_path), [str(image) for image in images], [_stamp(image) for image in images]])
            cache = Path(cache_dir) / f"rices-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if cache is not None and cache.is_file():
            self.features = load_file(cache)["features"]
        else:
            self.features = image_features(model, processor, images, batch_size, progress)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                save_file({"features": self.features.contiguous()}, cache)
        self.cache_file = cache

    def find(self, query_images: list, k: int) -> list[list[int]]:
        """Support indices of the k demonstrations of each query image, the most similar last."""
        return nearest(image_features(self.model, self.processor, query_images, self.batch_size), self.features, k)


def _stamp(image) -> list:
    """Size and modification time of an image file, so an edited support set is not served stale features."""
    path = Path(str(image))
    if not path.is_file():
        return []
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]
