"""Converters from OpenFlamingo-format, flamingo-mini and open_clip checkpoints to Flaminko."""

from .checkpoint_io import ConversionSummary, load_state_dict
from .open_flamingo import convert_open_flamingo

__all__ = ["ConversionSummary", "convert_open_flamingo", "load_state_dict"]
