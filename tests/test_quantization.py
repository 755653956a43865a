"""Quantized loading (from_pretrained's quantization_config with each quantizer installed here) and
flaminko.quantize (PyTorch's dynamic int8), on a tiny model saved and loaded back."""

import importlib.util

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText

import flaminko
from conftest import build_model, solid
from flaminko import FlaminkoForConditionalGeneration, tiny

PRECISE = FlaminkoForConditionalGeneration._modules_not_to_quantize


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, backbones):
    """A tiny model whose LM is 64 wide (bitsandbytes' 4-bit blocks are 64 values), gates open."""
    root = tmp_path_factory.mktemp("quantization")
    torch.manual_seed(0)
    language = tiny.save_tiny_language_model(root / "lm", "gpt_neox", hidden_size=64)
    model, processor = build_model({"vision": backbones["vision"], "gpt_neox": language})
    model.save_pretrained(root / "flaminko")
    processor.save_pretrained(root / "flaminko")
    batch = processor(text=["<image>Output:"], images=[[solid("red")]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return root / "flaminko", batch, logits


def _is_full_precision(module):
    return type(module) is nn.Linear and type(module.weight) is nn.Parameter and module.weight.dtype == torch.float32


def _linear_layers(model, prefix):
    """Linear layers under prefix, whatever class a quantizer replaced them with."""
    return {name: module for name, module in model.named_modules() if name.startswith(prefix) and hasattr(module, "in_features")}


def _installed(module_name):
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _quantization_configs():
    """(id, factory) for every quantizer whose package is installed; the others are skipped."""
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    def torchao_int8():
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())

    cases = [
        ("torchao-int8-weight-only", "torchao", torchao_int8, 0.05),
        ("quanto-int8", "optimum.quanto", lambda: QuantoConfig(weights="int8"), 0.05),
        ("bitsandbytes-8bit", "bitsandbytes", lambda: BitsAndBytesConfig(load_in_8bit=True), 0.05),
        # 4 bits (NF4) on random weights of a 64-wide model: a coarse check that the layers compute.
        ("bitsandbytes-4bit", "bitsandbytes", lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), 0.5),
    ]
    return [
        pytest.param(factory, tolerance, id=name, marks=pytest.mark.skipif(not _installed(package), reason=f"{package} is not installed"))
        for name, package, factory, tolerance in cases
    ]


def _relative_error(logits, reference):
    return ((logits - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("make_config, tolerance", _quantization_configs())
def test_quantization_config_quantizes_the_lm_and_keeps_the_rest_precise(saved_model, make_config, tolerance):
    folder, batch, reference_logits = saved_model
    config = make_config()
    # Through the Auto class, as users load it: it reaches Flaminko's from_pretrained.
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config)
    decoder = _linear_layers(model, "language_model.gpt_neox.layers")
    assert decoder and not any(_is_full_precision(module) for module in decoder.values())
    for prefix in PRECISE:
        kept = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and
                (name.startswith(prefix) or name.endswith(prefix))}
        assert kept and all(_is_full_precision(module) for module in kept.values()), prefix
    # The caller's config still names no skip list: from_pretrained filled in a copy.
    assert getattr(config, "llm_int8_skip_modules", None) is None and getattr(config, "modules_to_not_convert", None) is None
    with torch.no_grad():
        logits = model(**batch).logits.float()
    assert _relative_error(logits, reference_logits) <= tolerance
    generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 4)
    # A model trained with its LM unfrozen (as the demo's) loads too: the integer weights stay frozen.
    unfrozen = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=make_config(), freeze_language_model=False)
    assert all(parameter.requires_grad for parameter in unfrozen.cross_attn_layers.parameters())


@pytest.mark.skipif(not _installed("optimum.quanto"), reason="optimum-quanto is not installed")
def test_a_skip_list_of_ones_own_is_respected(saved_model):
    folder, _, _ = saved_model
    model = FlaminkoForConditionalGeneration.from_pretrained(
        folder, quantization_config={"quant_method": "quanto", "weights": "int8", "modules_to_not_convert": ["language_model.lm_head"]}
    )
    assert not any(_is_full_precision(module) for module in _linear_layers(model, "cross_attn_layers").values())
    assert _is_full_precision(model.language_model.lm_head)
    assert model.config.quantization_config.modules_to_not_convert == ["language_model.lm_head"]


def test_quantize_helper_int8_layers_and_logits_close_to_float32(saved_model):
    folder, batch, reference_logits = saved_model
    model = flaminko.quantize(FlaminkoForConditionalGeneration.from_pretrained(folder))
    quantized = {name for name, module in model.named_modules() if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)}
    assert {"language_model.gpt_neox.layers.0.mlp.dense_h_to_4h", "cross_attn_layers.0.ff.up_proj", "cross_attn_layers.0.attn.to_q"} <= quantized
    assert not any(name.startswith(("vision_model", "perceiver")) or name.endswith(("to_kv", "lm_head")) for name in quantized)
    with torch.no_grad():
        logits = model(**batch).logits
    assert _relative_error(logits, reference_logits) <= 0.1
    generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 4)


def test_quantize_helper_refuses_what_it_cannot_quantize(saved_model):
    folder, _, _ = saved_model
    with pytest.raises(TypeError, match="FlaminkoForConditionalGeneration"):
        flaminko.quantize(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="float32"):
        flaminko.quantize(FlaminkoForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16))
