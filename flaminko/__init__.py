"""Flaminko: a Hugging Face transformers-native Flamingo, Korean first.

The public names load on first use (PEP 562), so `flaminko --help` and the command line's error
messages do not wait for torch and transformers. Importing any of them registers the classes with
the Auto classes (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor).
"""

import functools
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "FlaminkoConfig": "configuration_flaminko",
    "FlaminkoForConditionalGeneration": "modeling_flaminko",
    "FlaminkoModel": "modeling_flaminko",
    "FlaminkoPreTrainedModel": "modeling_flaminko",
    "FlaminkoProcessor": "processing_flaminko",
    "create_model_and_transforms": "open_flamingo",
    "quantize": "quantization",
}

__all__ = list(_PUBLIC)


@functools.cache
def register_auto_classes():
    """Registers Flaminko with transformers' Auto classes, and marks every saved folder to carry the
    code files and an auto_map, so it loads with trust_remote_code=True where this package is
    not installed. Runs once: when a public name is first used, and on import of the modules that
    save or load models (training, demo, inference, release, the `convert` command)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .configuration_flaminko import FlaminkoConfig
    from .modeling_flaminko import FlaminkoForConditionalGeneration
    from .processing_flaminko import FlaminkoProcessor

    AutoConfig.register(FlaminkoConfig.model_type, FlaminkoConfig, exist_ok=True)
    AutoModel.register(FlaminkoConfig, FlaminkoForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(FlaminkoConfig, FlaminkoForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(FlaminkoConfig, FlaminkoProcessor, exist_ok=True)
    FlaminkoConfig.register_for_auto_class()
    FlaminkoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    FlaminkoProcessor.register_for_auto_class()


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flaminko' has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
