"""MosaicGPT (mosaicml/examples v0.0.4; mpt-1b-redpajama-200b, OpenFlamingo-3B's LM) -> transformers' MPT.

A MosaicGPT folder holds remote code; it is read here without running it: its config.json becomes
an MptConfig and its weights get transformers' MPT names. What transformers' MPT does not compute,
and Flaminko does not add (its QK LayerNorm it does add), is refused rather than converted wrong.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import MptConfig

from .checkpoint_io import load_state_dict

MOSAIC_GPT_MODEL_TYPE = "mosaic_gpt"
# MosaicGPT's module names -> transformers' MPT names, inside transformer.blocks.{i}. and at the top.
_BLOCK_RENAMES = {
    "ln_1.weight": "norm_1.weight",
    "ln_2.weight": "norm_2.weight",
    "mlp.mlp_up.weight": "ffn.up_proj.weight",
    "mlp.mlp_down.weight": "ffn.down_proj.weight",
    "attn.Wqkv.weight": "attn.Wqkv.weight",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "attn.q_ln.weight": "attn.q_ln.weight",
    "attn.k_ln.weight": "attn.k_ln.weight",
}
_TOP_RENAMES = {"transformer.wte.weight": "transformer.wte.weight", "transformer.ln_f.weight": "transformer.norm_f.weight"}
# transformers' MPT hard-codes these: a config with other values computes something else there.
_MPT_FIXED = {"expansion_ratio": 4, "logit_scale": None, "no_bias": True}
_MPT_ATTENTION_FIXED = {
    "alibi": True,
    "alibi_bias_max": 8,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
    "attn_type": "multihead_attention",
}


def read_config_json(folder) -> dict | None:
    """A local model folder's config.json as a dict (None when `folder` is not a local folder)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def model_config_dict(name) -> dict | None:
    """A model's config.json as a dict, from its folder or (that one file) from the Hub; None for
    anything else, which the loading code then names."""
    from ..hub import is_hub_id

    if os.path.isdir(name):
        return read_config_json(name)
    if not is_hub_id(str(name)):
        return None
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(str(name), "config.json")).read_text())


def download_without_code(repo_id: str) -> str:
    """A Hub model's config, weights and tokenizer (never its code) in the local cache; returns the folder."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"])


def is_mosaic_gpt(config: dict | None) -> bool:
    return config is not None and config.get("model_type") == MOSAIC_GPT_MODEL_TYPE


def _json_number(mosaic: dict, name: str, kind: type, default=None):
    """A MosaicGPT config.json number as the type transformers' strict MptConfig declares for it:
    2048.0 may stand for an int and 8 for a float, with the same meaning; 2048.5 cannot."""
    value = mosaic.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if kind is int and not float(value).is_integer():
        raise ValueError(f"This MosaicGPT configuration cannot be converted faithfully: {name}={value!r} is not a whole number")
    return kind(value)


def mpt_config_from_mosaic_gpt(mosaic: dict) -> tuple[MptConfig, list[str]]:
    """The MptConfig computing what a MosaicGPT config.json describes, and what changed on the way
    (dropout: see below); ValueError naming every setting that transformers' MPT (with Flaminko's QK
    LayerNorm) cannot honour."""
    wanted = {
        "alibi": True,  # transformers' MPT has no learned position embedding (MosaicGPT's wpe)
        "alibi_bias_max": 8,
        "prefix_lm": False,
        "attn_uses_sequence_id": False,
        "logit_scale": None,
        "no_bias": True,
        "mlp_ratio": 4,
        "embedding_fraction": 1.0,
    }
    problems = [f"{name}={mosaic.get(name)!r} (supported: {value!r})" for name, value in wanted.items() if mosaic.get(name, value) != value]
    if mosaic.get("attn_qk_ln") and mosaic.get("attn_clip_qkv"):
        problems.append("attn_clip_qkv together with attn_qk_ln (MosaicGPT clips before the norms)")
    heads = _json_number(mosaic, "n_heads", int, 16)
    if heads & (heads - 1):
        # MosaicGPT v0.0.4's ALiBi slopes differ from MPT's when the head count is no power of two.
        problems.append(f"n_heads={heads} (ALiBi slopes match MPT's only for a power of two)")
    if problems:
        raise ValueError("This MosaicGPT configuration cannot be converted faithfully: " + "; ".join(problems))
    # MosaicGPT types its dropouts as floats (config.json: 0.0); transformers' MPT applies one dropout,
    # attn_config.attn_pdrop, in attention and on both residual branches, and declares it an int.
    # Dropout only acts in training, so the converted LM gets none and the summary says so.
    dropouts = {name: mosaic.get(name, 0.0) for name in ("attn_pdrop", "resid_pdrop", "emb_pdrop")}
    notes = [
        "dropout: MosaicGPT's "
        + ", ".join(f"{name}={value!r}" for name, value in dropouts.items())
        + " -> MPT attn_config.attn_pdrop=0, resid_pdrop=0.0, emb_pdrop=0.0 (transformers' MPT declares"
        " attn_pdrop an int; dropout does not change inference; fine-tuning runs without it)"
    ]
    config = MptConfig(
        d_model=_json_number(mosaic, "d_model", int),
        n_heads=heads,
        n_layers=_json_number(mosaic, "n_layers", int),
        expansion_ratio=4,
        max_seq_len=_json_number(mosaic, "max_seq_len", int),
        vocab_size=_json_number(mosaic, "vocab_size", int),
        resid_pdrop=0.0,
        emb_pdrop=0.0,
        layer_norm_epsilon=1e-5,  # torch's LayerNorm default, which MosaicGPT's norms keep
        learned_pos_emb=False,
        attn_config={
            "attn_pdrop": 0,
            "attn_impl": "torch",
            "clip_qkv": _json_number(mosaic, "attn_clip_qkv", float),
            "softmax_scale": _json_number(mosaic, "softmax_scale", float),
            "qk_ln": bool(mosaic.get("attn_qk_ln")),
            "alibi": True,
            "alibi_bias_max": 8,
        },
        no_bias=True,
        logit_scale=None,
        tie_word_embeddings=True,
        use_cache=True,
        bos_token_id=_json_number(mosaic, "bos_token_id", int),
        eos_token_id=_json_number(mosaic, "eos_token_id", int),
        pad_token_id=_json_number(mosaic, "pad_token_id", int),
    )
    return config, notes


def check_mpt_config(config):
    """ValueError naming the settings of an MptConfig that transformers' MPT ignores (it hard-codes
    them), so that such an LM is refused instead of converted wrong."""
    problems = [
        f"{name}={getattr(config, name, value)!r} (supported: {value!r})"
        for name, value in _MPT_FIXED.items()
        if getattr(config, name, value) != value
    ]
    attention = config.attn_config
    problems += [
        f"attn_config.{name}={getattr(attention, name, value)!r} (supported: {value!r})"
        for name, value in _MPT_ATTENTION_FIXED.items()
        if getattr(attention, name, value) != value
    ]
    if attention.qk_ln and attention.clip_qkv:
        problems.append("attn_config.qk_ln together with attn_config.clip_qkv")
    if problems:
        raise ValueError("This MPT configuration is not computed faithfully by transformers' MPT: " + "; ".join(problems))


def mosaic_gpt_key_to_mpt(key: str) -> str | None:
    """The transformers MPT name of a MosaicGPT weight, or None when MPT has no place for it."""
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    match = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", key)
    if match and match.group(2) in _BLOCK_RENAMES:
        return f"transformer.blocks.{match.group(1)}.{_BLOCK_RENAMES[match.group(2)]}"
    return None



# Files of a model folder that make up its tokenizer (copied along; its code and weights are not).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.model")
WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def weight_files(folder: Path) -> list[str]:
    """The weight files of a model folder: the shards its index names, or its single file."""
    for index, single in WEIGHT_FILES:
        if (folder / index).is_file():
            return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        if (folder / single).is_file():
            return [single]
    raise ValueError(f"{str(folder)!r} has no weights (none of {[name for pair in WEIGHT_FILES for name in pair]})")


def expected_mpt_weights(config: MptConfig) -> set[str]:
    per_block = [name for name in _BLOCK_RENAMES.values() if config.attn_config.qk_ln or "_ln." not in name]
    blocks = {f"transformer.blocks.{i}.{name}" for i in range(config.n_layers) for name in per_block}
    return blocks | set(_TOP_RENAMES.values())


def write_mosaic_gpt_as_mpt(folder, out, dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """Write a MosaicGPT folder as a transformers MPT folder at `out` (config, safetensors shards in
    `dtype`, the tokenizer), one shard at a time; returns (out, the QK LayerNorm weights, which
    transformers' MPT has no place for and Flaminko's model does, and the config's notes)."""
    folder, out = Path(folder), Path(out)
    config, notes = mpt_config_from_mosaic_gpt(read_config_json(folder))
    out.mkdir(parents=True)
    files = weight_files(folder)
    query_key_norms, unplaced, weight_map = {}, [], {}
    for number, name in enumerate(tqdm(files, desc="MosaicGPT shards", unit="shard"), start=1):
        shard_name = f"model-{number:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors"
        shard = {}
        for key, tensor in load_state_dict(folder / name).items():
            target = mosaic_gpt_key_to_mpt(key)
            if target is None:
                unplaced.append(key)
            elif "_ln." in target:
                query_key_norms[target] = tensor.clone()
            else:
                shard[target] = tensor.to(dtype).contiguous()
                weight_map[target] = shard_name
        save_file(shard, out / shard_name, metadata={"format": "pt"})
        del shard
    missing = expected_mpt_weights(config) - set(weight_map) - set(query_key_norms)
    if unplaced or missing:
        raise ValueError(
            "The MosaicGPT weights do not fit transformers' MPT.\n"
            + (f"Keys with no place ({len(unplaced)}): {sorted(unplaced)}\n" if unplaced else "")
            + (f"Weights missing ({len(missing)}): {sorted(missing)}" if missing else "")
        )
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    for pattern in TOKENIZER_FILES:
        for path in folder.glob(pattern):
            shutil.copyfile(path, out / path.name)
    return str(out), query_key_norms, notes
