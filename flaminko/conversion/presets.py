"""The released OpenFlamingo-family models, each with what its conversion needs.

`flaminko convert open-flamingo --preset NAME` takes the checkpoint, the backbones, the layer
spacing, the vision-feature convention and the token-row handling from here; `--checkpoint`,
`--lm`, `--vision` and `--tokenizer` override the downloads with local files.
"""

from dataclasses import dataclass

CLIP_VIT_L_14 = "openai/clip-vit-large-patch14"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Release:
    checkpoint_repo: str | None  # None: no checkpoint was released; the user brings theirs
    language_model: str | None  # None: the user brings the LM (LLaMA-7B's licence forbids redistribution)
    cross_attn_every_n_layers: int
    # The converted repo carries the LM's weights, so it takes the LM's licence. The release cards
    # name none (their front matter: language and datasets only); OpenFlamingo's own code is MIT.
    license: str
    # OpenFlamingo's checkpoints save no LLaMA lm_head, so its rows for the added tokens are missing.
    init_missing_token_rows: bool = False
    vision: str = CLIP_VIT_L_14
    # Released models were trained before open_clip 2.23: patch tokens before ln_post, QuickGELU.
    convention: str = "openflamingo"
    # Their tokenizers (GPT-NeoX-20B's, LLaMA's, Polyglot-Ko's) had no pad token: OpenFlamingo added <PAD>.
    pad_token_added: bool = True


PRESETS = {
    "OpenFlamingo-3B-vitl-mpt1b": Release("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b", 1, "apache-2.0"),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct", "anas-awadalla/mpt-1b-redpajama-200b-dolly", 1, "cc-by-sa-3.0"
    ),
    "OpenFlamingo-4B-vitl-rpj3b": Release(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, "apache-2.0"
    ),
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": Release(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct", "togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2, "apache-2.0"
    ),
    "OpenFlamingo-9B-vitl-mpt7b": Release("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", 4, "apache-2.0"),
    "OpenFlamingo-9B-deprecated": Release("openflamingo/OpenFlamingo-9B-deprecated", None, 4, "other", init_missing_token_rows=True),
    "OpenFlaminKO": Release(None, "EleutherAI/polyglot-ko-1.3b", 1, "apache-2.0"),
}


def resolve_preset(name: str, *, checkpoint=None, language_model=None, vision=None) -> dict:
    """convert_open_flamingo's arguments for a release, local files overriding its downloads.
    The checkpoint is downloaded through huggingface_hub unless given; the backbones' Hub ids are
    left to transformers (which downloads them) unless given."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    release = PRESETS[name]
    if language_model is None and release.language_model is None:
        raise ValueError(
            f"{name} is built on LLaMA-7B, whose weights cannot be downloaded for you: convert your own LLaMA-7B "
            "to Hugging Face format and pass its folder with --lm"
        )
    if checkpoint is None and release.checkpoint_repo is None:
        raise ValueError(f"{name} released no checkpoint: pass your training checkpoint with --checkpoint")
    if checkpoint is None:
        from huggingface_hub import hf_hub_download

        checkpoint = hf_hub_download(release.checkpoint_repo, CHECKPOINT_FILE)
    vision = vision or release.vision
    language_model = language_model or release.language_model
    return {
        "checkpoint_path": checkpoint,
        "vision": vision,
        "language_model": language_model,
        "cross_attn_every_n_layers": release.cross_attn_every_n_layers,
        "init_missing_token_rows": release.init_missing_token_rows,
        "convention": release.convention,
        # The card names the released backbones, whichever local copies were converted.
        "base_models": [release.vision, release.language_model or language_model],
        "license": release.license,
        "pad_token_added": release.pad_token_added,
        "origin": f"{name} ({release.checkpoint_repo})" if release.checkpoint_repo else name,
    }
