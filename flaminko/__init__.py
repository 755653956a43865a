"""Flaminko: a Hugging Face transformers-native Flamingo, Korean first."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_flaminko import FlaminkoConfig
from .modeling_flaminko import FlaminkoForConditionalGeneration, FlaminkoPreTrainedModel
from .open_flamingo import create_model_and_transforms
from .processing_flaminko import FlaminkoProcessor

__version__ = "0.1.0"

AutoConfig.register(FlaminkoConfig.model_type, FlaminkoConfig, exist_ok=True)
AutoModel.register(FlaminkoConfig, FlaminkoForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FlaminkoConfig, FlaminkoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FlaminkoConfig, FlaminkoProcessor, exist_ok=True)

# Every saved folder carries the three files and an auto_map, so it loads with
# trust_remote_code=True where this package is not installed.
FlaminkoConfig.register_for_auto_class()
FlaminkoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
FlaminkoProcessor.register_for_auto_class()

__all__ = [
    "FlaminkoConfig",
    "FlaminkoForConditionalGeneration",
    "FlaminkoPreTrainedModel",
    "FlaminkoProcessor",
    "create_model_and_transforms",
]
