"""The fastest CPU inference: PyTorch's dynamic int8 quantization of the layers a decoding step reads.

    model = flaminko.quantize(FlaminkoForConditionalGeneration.from_pretrained(path))

A batch-1 decoding step on a CPU streams every weight it multiplies by once; stored as int8 instead of
float32 they are a quarter of the bytes, and PyTorch's dynamic quantization (`quantize_dynamic`:
int8 weights with a scale per output row, activations quantized on the fly per call) multiplies
them with FBGEMM/oneDNN int8 kernels. Of the CPU paths measured for this project it decodes
fastest, ahead of the `quantization_config` quantizers (docs/quantization.md;
benchmarks/quantize.py).

It is CPU-only, for inference, and in memory only (a quantized model is not saved: quantize after
loading). On a GPU load with `quantization_config=` (bitsandbytes, torchao) instead.
"""

import warnings

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.quantizers_utils import should_convert_module

# What a decoding step does not read, or what decides its result, stays float32: the vision tower
# and the resampler (once per generate call), the gated blocks' media key/value projection (once per
# call, and its error would shift every cross-attention), and the output layer (picks each token).
# The gated blocks' query, output and feed-forward layers are read at every step, like the LM's, so
# they are quantized. Patterns as in quantization_config's modules_to_not_convert.
DYNAMIC_INT8_SKIPS = ("vision_model", "perceiver", "to_kv", "language_model.lm_head")


def quantize(model, *, modules_to_not_convert=DYNAMIC_INT8_SKIPS):
    """Replaces the model's float32 `nn.Linear` layers, except those matching modules_to_not_convert
    (module-name prefixes, suffixes or regular expressions), with dynamically quantized int8 ones, in
    place; returns the model. CPU, float32 models only; the result runs `generate` and `forward`
    but does not train and is not saved. Takes the class of this package and the same class loaded
    as remote code (trust_remote_code=True)."""
    if not (isinstance(model, PreTrainedModel) and model.config.model_type == "flaminko"):
        raise TypeError(f"quantize expects a FlaminkoForConditionalGeneration, got {type(model).__name__}")
    if model.device.type != "cpu":
        raise ValueError(
            f"quantize is PyTorch's CPU int8 path, but the model is on {model.device}: on a GPU load it "
            "with from_pretrained(..., quantization_config=BitsAndBytesConfig(...) or TorchAoConfig(...))"
        )
    if getattr(model, "is_quantized", False):
        raise ValueError(f"the model is already quantized ({model.quantization_method}); load it without quantization_config")
    targets = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, list(modules_to_not_convert))
    }
    not_float32 = sorted({str(module.weight.dtype) for module in targets.values()} - {"torch.float32"})
    if not_float32:
        raise ValueError(f"quantize expects a float32 model, got {', '.join(not_float32)} weights: load it with dtype=torch.float32")
    if not targets:
        raise ValueError("quantize found no nn.Linear layer outside modules_to_not_convert: the model may be quantized already")
    qconfig_spec = dict.fromkeys(targets, torch.ao.quantization.per_channel_dynamic_qconfig)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, whose CPU int8 paths decode slower
        # than this one here (docs/quantization.md); the warning says so on every call, which is what the user chose.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.quantize_per_(tensor|channel).*deprecated", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(model, qconfig_spec, inplace=True)
    return model
