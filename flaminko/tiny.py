"""Tiny backbones built from configs, for tests, examples and the demo: nothing is downloaded.

Each family gets a causal LM of a few layers and a byte-level BPE tokenizer trained on the
text this package ships; the vision tower is a small CLIP. They are saved to folders and loaded
back through the same code paths as pretrained Hub models.
"""

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
)

TEXT_FAMILIES = ("gpt_neox", "llama", "gpt2", "opt", "qwen2", "gptj", "mpt")
IMAGE_SIZE = 32

_TEXT_CONFIGS = {
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, rotary_pct=0.5),
    "llama": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=512),
    "opt": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "qwen2": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "gptj": dict(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=512),
    "mpt": dict(d_model=32, n_layers=4, n_heads=4, expansion_ratio=2, max_seq_len=512),
}


def shipped_text() -> list[str]:
    text = resources.files("flaminko").joinpath("resources/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <|endoftext|> as BOS/EOS, like GPT-NeoX's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    settings.update(overrides)
    settings.setdefault("intermediate_size", 2 * settings["hidden_size"])
    return CLIPVisionConfig(**settings)


def tiny_text_config(family: str, vocab_size: int, **overrides):
    if family not in _TEXT_CONFIGS:
        raise ValueError(f"No tiny config for LM family {family!r}; known: {', '.join(TEXT_FAMILIES)}")
    settings = {**_TEXT_CONFIGS[family], **overrides}
    if "intermediate_size" in _TEXT_CONFIGS[family] and "hidden_size" in overrides:
        settings["intermediate_size"] = overrides.get("intermediate_size", 2 * overrides["hidden_size"])
    return AutoConfig.for_model(family, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **settings)


def save_tiny_vision(folder: str | Path, **overrides) -> Path:
    """A tiny CLIP vision tower and its image processor, saved like a Hub CLIP folder."""
    folder = Path(folder)
    config = tiny_vision_config(**overrides)
    CLIPVisionModel(config).save_pretrained(folder)
    size = config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def save_tiny_language_model(
    folder: str | Path, family: str = "gpt_neox", texts: list[str] | None = None, vocab_size: int = 400, **overrides
) -> Path:
    """A tiny causal LM of the family with a tokenizer trained on texts (default: the shipped text)."""
    folder = Path(folder)
    tokenizer = train_tokenizer(texts or shipped_text(), vocab_size=vocab_size)
    config = tiny_text_config(family, vocab_size=len(tokenizer), **overrides)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
