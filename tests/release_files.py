"""Stand-ins of the released backbones, built from their real files (tests/fixtures/releases, whose
README names where each file came from and which could not be found): every field of the real
file with its JSON type; only the sizes shrink, each one named here and checked to be in the file."""

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPConfig, CLIPModel

from flaminko import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "releases"
# Vocabularies padded past the tokenizer, as mpt-1b's and mpt-7b's 50432 rows for 50277 tokens and
# polyglot-ko-1.3b's 30080 for 30003.
PADDED_VOCAB = 448
TOKENIZER_VOCAB = len(tiny.train_tokenizer(tiny.shipped_text()))
# The image size stays 224: the file's vision_config_dict, which transformers reads before its
# vision_config, has none, so CLIP's default 224 applies. 32-pixel patches keep it to 49 tokens.
CLIP_VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 32}
CLIP_TEXT_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
SIZES = {
    "openai/clip-vit-large-patch14": {
        "projection_dim": 16,
        "text_config": {**CLIP_TEXT_SIZES, "projection_dim": 16},
        "text_config_dict": {**CLIP_TEXT_SIZES, "projection_dim": 16},
        "vision_config": {**CLIP_VISION_SIZES, "projection_dim": 16},
        "vision_config_dict": {**CLIP_VISION_SIZES, "projection_dim": 16},
    },
    "anas-awadalla/mpt-1b-redpajama-200b": {"d_model": 32, "n_heads": 4, "n_layers": 4, "max_seq_len": 256, "vocab_size": PADDED_VOCAB},
    "mosaicml/mpt-7b": {"d_model": 32, "n_heads": 4, "n_layers": 4, "max_seq_len": 256, "vocab_size": PADDED_VOCAB},
    "EleutherAI/polyglot-ko-1.3b": {
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "max_position_embeddings": 256,
        "vocab_size": PADDED_VOCAB,
    },
    "decapoda-research/llama-7b-hf": {
        "hidden_size": 32,
        "intermediate_size": 86,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "max_sequence_length": 256,
        "vocab_size": TOKENIZER_VOCAB,  # LLaMA's 32000 rows are its tokenizer's 32000 tokens
    },
}


def real_file(repo: str, name: str = "config.json") -> dict:
    return json.loads((FIXTURES / repo.replace("/", "--") / name).read_text())


def shrink(real: dict, sizes: dict) -> dict:
    """`real` with `sizes` put in; each size replaces a value of the same JSON type."""
    out = dict(real)
    for key, size in sizes.items():
        assert key in real, f"{key!r} is not in the real file"
        if isinstance(size, dict):
            out[key] = shrink(real[key], size)
        else:
            assert type(size) is type(real[key]), f"{key}: {size!r} is not of the real file's type ({real[key]!r})"
            out[key] = size
    return out


def release_config(repo: str) -> dict:
    return shrink(real_file(repo), SIZES[repo])


def save_clip_release(folder: Path) -> Path:
    """openai/clip-vit-large-patch14 as on the Hub (the whole CLIPModel, its config.json and
    preprocessor_config.json as written there), at a tiny width."""
    config = release_config("openai/clip-vit-large-patch14")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig.from_dict(config)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(real_file("openai/clip-vit-large-patch14", "preprocessor_config.json"), indent=2))
    return folder


def save_language_model_release(folder: Path, repo: str) -> Path:
    """A causal LM as its Hub folder has it: weights for its real config.json (shrunk), that
    config.json itself, and a tokenizer trained on the shipped text (the releases' tokenizer files
    could not be found)."""
    folder.mkdir(parents=True)
    config = release_config(repo)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tiny.train_tokenizer(tiny.shipped_text()).save_pretrained(folder)
    return folder
