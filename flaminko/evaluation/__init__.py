"""Evaluation harness: `flaminko eval` and its Python API (`evaluate`), the ranking API, metrics.

Modules: prompts (OpenFlamingo's prompt strings and decoding defaults), metrics (CIDEr-D, BLEU-4,
VQA accuracy, top-k, ROC AUC), datasets (loaders for each task's formats), rices (demonstration
retrieval), ranking (candidate log-likelihoods), runner (the few-shot loop).
"""

from .metrics import captioning_scores, classification_scores, normalize_vqa_answer, vqa_accuracy, vqa_scores
from .prompts import PROMPT_FORMATS, build_prompt
from .ranking import rank_images, score_candidates
from .rices import RICES
from .runner import evaluate

__all__ = [
    "PROMPT_FORMATS",
    "RICES",
    "build_prompt",
    "captioning_scores",
    "classification_scores",
    "evaluate",
    "normalize_vqa_answer",
    "rank_images",
    "score_candidates",
    "vqa_accuracy",
    "vqa_scores",
]
