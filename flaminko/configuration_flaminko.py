"""Flaminko configuration: a CLIP vision tower, a Perceiver resampler and gated cross-attention
blocks in front of any Hugging Face causal LM. Also the settings decided before a model is built: the
transformers window (and the names that differ within it) and what a quantization config leaves unquantized.

Shipped to the Hub as remote code: imports only torch, transformers and sibling files.
"""

import copy

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# The transformers releases these files are tested on, both ends in CI. Users run the shipped copies
# on their own transformers, so what differs between releases is decided here, once.
TRANSFORMERS_WINDOW = ">=5.23,<5.26"
TRANSFORMERS_VERSION = Version(Version(transformers.__version__).base_version)
if TRANSFORMERS_VERSION not in SpecifierSet(TRANSFORMERS_WINDOW):
    raise ImportError(
        f"Flaminko runs on transformers {TRANSFORMERS_WINDOW} and this is transformers {transformers.__version__}: "
        f'pip install "transformers{TRANSFORMERS_WINDOW}"'
    )
# 5.24 renamed past_key_values to `cache` in forward, in generate's model kwargs and in outputs.
CACHE_NAME = "cache" if TRANSFORMERS_VERSION >= Version("5.24") else "past_key_values"


def cache_field_named_by_transformers(output_class):
    """Renames a model output class's `cache` field to the installed transformers' name for it (before 5.24:
    past_key_values), keeping the field order, so that generate finds the cache where it looks."""
    if CACHE_NAME != "cache":
        output_class.__annotations__ = {
            (CACHE_NAME if name == "cache" else name): kind for name, kind in output_class.__annotations__.items()
        }
        setattr(output_class, CACHE_NAME, vars(output_class)["cache"])
        delattr(output_class, "cache")
    return output_class


# CLIP ViT-L/14 at 224 px, the vision tower of OpenFlamingo and OpenFlaminKO.
DEFAULT_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# EleutherAI/polyglot-ko-1.3b, the language model of OpenFlaminKO.
DEFAULT_TEXT_CONFIG = {
    "model_type": "gpt_neox",
    "vocab_size": 30080,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 8192,
    "rotary_pct": 0.5,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 2048,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 2,
}


def _as_config(value, default: dict, name: str) -> PreTrainedConfig:
    if value is None:
        value = dict(default)
    if isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or a PreTrainedConfig, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{name} needs a 'model_type' entry to pick its config class")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{name} names model_type {model_type!r}, which this transformers does not know")
    return CONFIG_MAPPING[model_type](**value)


def check_positive_ints(**settings):
    for name, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def quantization_config_skipping(quantization_config, modules: list[str]):
    """quantization_config (a config or its dict) leaving `modules` unquantized, unless it names its own
    modules to skip (bitsandbytes: llm_int8_skip_modules; the others: modules_to_not_convert). The caller's
    object is left unchanged."""
    is_dict = isinstance(quantization_config, dict)
    method = quantization_config.get("quant_method") if is_dict else getattr(quantization_config, "quant_method", None)
    field = "llm_int8_skip_modules" if method == "bitsandbytes" else "modules_to_not_convert"
    if is_dict:
        if quantization_config.get(field) is not None:
            return quantization_config
        return {**quantization_config, field: list(modules)}
    if not hasattr(quantization_config, field) or getattr(quantization_config, field) is not None:
        return quantization_config
    quantization_config = copy.deepcopy(quantization_config)
    setattr(quantization_config, field, list(modules))
    return quantization_config


class FlaminkoConfig(PreTrainedConfig):
    r"""Configuration of [`FlaminkoForConditionalGeneration`].

    The defaults give the OpenFlaminKO shapes: CLIP ViT-L/14 + Polyglot-Ko-1.3B with a gated
    cross-attention block before every decoder layer.

    Example:

    ```python
    >>> from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration
    >>> config = FlaminkoConfig(cross_attn_every_n_layers=4)
    >>> model = FlaminkoForConditionalGeneration(config)
    ```
    """

    model_type = "flaminko"
    keys_to_ignore_at_inference = [CACHE_NAME, "image_outputs", "image_features", "media_key_values", "image_token_count"]
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}
    # transformers' vision-language models name their placeholder's id `image_token_id` (TRL reads it).
    attribute_map = {"image_token_id": "media_token_id"}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        # Gated cross-attention before decoder layer i when (i + 1) % n == 0 (OpenFlamingo's rule).
        cross_attn_every_n_layers: int = 1,
        # Explicit decoder-layer indices instead of the rule above (flamingo-mini: 0, n, 2n, ...).
        cross_attn_layers: list[int] | None = None,
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
        cross_attn_ff_mult: int = 4,
        cross_attn_ff_act: str = "gelu",
        # True: a token sees only the latest image before it; False: every image before it.
        only_attend_immediate_media: bool = True,
        # The resampler reads the vision tower's last hidden states: the patch tokens (OpenFlamingo),
        # or with the CLS token too (flamingo-mini).
        vision_feature_include_cls: bool = False,
        # False: the tokens before CLIP's post-layernorm, as OpenFlamingo's released models were
        # trained (open_clip < 2.23). True: after it, as open_clip >= 2.23 returns them; a checkpoint
        # trained under such an open_clip needs it (docs/conversion.md tells how to find out).
        vision_feature_post_layernorm: bool = False,
        # Perceiver resampler over those tokens (width = vision hidden size).
        perceiver_depth: int = 6,
        perceiver_heads: int = 8,
        perceiver_dim_head: int = 64,
        perceiver_num_latents: int = 64,
        perceiver_ff_mult: int = 4,
        perceiver_ff_act: str = "gelu",
        # Learned per-frame embeddings for video media; None: no frame embeddings (released models).
        max_num_frames: int | None = None,
        # Special tokens added by FlaminkoProcessor; None until a tokenizer assigns them.
        media_token_id: int | None = None,
        eoc_token_id: int | None = None,
        # What stays frozen, as in OpenFlamingo: the vision tower and the LM, except the input
        # embedding rows of <image> and <|endofchunk|>.
        freeze_vision_model: bool = True,
        freeze_language_model: bool = True,
        train_new_token_embeddings: bool = True,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        vision_config = _as_config(vision_config, DEFAULT_VISION_CONFIG, "vision_config")
        text_config = _as_config(text_config, DEFAULT_TEXT_CONFIG, "text_config")
        if not isinstance(vision_config, CLIPVisionConfig):
            raise ValueError(f"vision_config must be a CLIP vision config, got {type(vision_config).__name__}")
        check_positive_ints(
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            cross_attn_heads=cross_attn_heads,
            cross_attn_dim_head=cross_attn_dim_head,
            cross_attn_ff_mult=cross_attn_ff_mult,
            perceiver_depth=perceiver_depth,
            perceiver_heads=perceiver_heads,
            perceiver_dim_head=perceiver_dim_head,
            perceiver_num_latents=perceiver_num_latents,
            perceiver_ff_mult=perceiver_ff_mult,
        )
        if max_num_frames is not None:
            check_positive_ints(max_num_frames=max_num_frames)
        num_layers = text_config.num_hidden_layers
        if cross_attn_layers is not None:
            if isinstance(cross_attn_layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in cross_attn_layers
            ):
                raise TypeError(f"cross_attn_layers must be a list of decoder-layer indices, got {cross_attn_layers!r}")
            if not cross_attn_layers:
                raise ValueError("cross_attn_layers is empty: the model would have no gated block and ignore every image")
            if any(not 0 <= i < num_layers for i in cross_attn_layers):
                raise ValueError(
                    f"cross_attn_layers must lie in 0..{num_layers - 1} (the language model has {num_layers} "
                    f"layers), got {list(cross_attn_layers)}"
                )
        elif cross_attn_every_n_layers > num_layers:
            raise ValueError(
                f"cross_attn_every_n_layers={cross_attn_every_n_layers} places no gated cross-attention block in a "
                f"language model of {num_layers} layers, so the model would ignore every image: use 1..{num_layers}"
            )
        for name, value in (("media_token_id", media_token_id), ("eoc_token_id", eoc_token_id)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be None or a token id (an int >= 0), got {value!r}")
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        self.cross_attn_layers = list(cross_attn_layers) if cross_attn_layers is not None else None
        self.cross_attn_heads = cross_attn_heads
        self.cross_attn_dim_head = cross_attn_dim_head
        self.cross_attn_ff_mult = cross_attn_ff_mult
        self.cross_attn_ff_act = cross_attn_ff_act
        self.only_attend_immediate_media = only_attend_immediate_media
        self.vision_feature_include_cls = vision_feature_include_cls
        self.vision_feature_post_layernorm = vision_feature_post_layernorm
        self.perceiver_depth = perceiver_depth
        self.perceiver_heads = perceiver_heads
        self.perceiver_dim_head = perceiver_dim_head
        self.perceiver_num_latents = perceiver_num_latents
        self.perceiver_ff_mult = perceiver_ff_mult
        self.perceiver_ff_act = perceiver_ff_act
        self.max_num_frames = max_num_frames
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        self.freeze_vision_model = freeze_vision_model
        self.freeze_language_model = freeze_language_model
        self.train_new_token_embeddings = train_new_token_embeddings
        self.initializer_range = initializer_range
        attn_implementation = kwargs.get("attn_implementation")
        super().__init__(**kwargs)
        # Set after the base class, whose attention setter would otherwise clear the attention
        # implementation that prebuilt sub-models already resolved.
        self.vision_config = vision_config
        self.text_config = text_config
        if attn_implementation is not None:
            self._attn_implementation = attn_implementation

    @property
    def cross_attn_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that get a gated cross-attention block in front."""
        if self.cross_attn_layers is not None:
            return sorted(self.cross_attn_layers)
        n = self.cross_attn_every_n_layers
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % n == 0]


__all__ = ["FlaminkoConfig"]
