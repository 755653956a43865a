"""OpenFlamingo's (and open_clip's) own model code as the oracle for converted checkpoints.

Needs `pip install --no-deps open-flamingo==2.0.1 einops einops-exts`. The package's __init__
imports open_clip (and torchvision); the model code itself needs only torch, einops and
transformers, so it is imported without running that __init__, around HF backbones.
"""

import importlib
import importlib.util
import sys
import types

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, GenerationMixin
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import apply_renamings
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from ..configuration_flaminko import CACHE_NAME
from ..modeling_flaminko import decoder_layers_path
from .checkpoint_io import load_state_dict
from .open_clip import open_clip_vision_config, strip_visual_prefix, vision_convention

INSTALL_HINT = "pip install --no-deps open-flamingo==2.0.1 einops einops-exts"


def open_flamingo_modules():
    """(flamingo, flamingo_lm, utils) modules of open_flamingo.src."""
    if "open_flamingo" not in sys.modules:
        spec = importlib.util.find_spec("open_flamingo")
        if spec is None:
            raise ImportError(f"The reference implementation is not installed: {INSTALL_HINT}")
        package = types.ModuleType("open_flamingo")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["open_flamingo"] = package
    try:
        return tuple(importlib.import_module(f"open_flamingo.src.{name}") for name in ("flamingo", "flamingo_lm", "utils"))
    except ImportError as error:
        raise ImportError(f"OpenFlamingo's model code needs einops and einops-exts: {INSTALL_HINT}") from error


def open_clip_transformer():
    """open_clip.transformer without the package __init__ (which needs torchvision, absent on CPU
    stacks whose torch has no matching torchvision); the one torchvision name its utils import is
    stood in for while importing, then removed."""
    names = ("open_clip", "torchvision", "torchvision.ops", "torchvision.ops.misc")
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("Verifying against open_clip's own tower needs open_clip: pip install --no-deps open_clip_torch")
    saved = {name: sys.modules.get(name) for name in names}
    package = types.ModuleType("open_clip")
    package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = nn.BatchNorm2d
    stand_ins = {
        "open_clip": package,
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.ops": types.ModuleType("torchvision.ops"),
        "torchvision.ops.misc": misc,
    }
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("open_clip.transformer")
    finally:
        for name in names:
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
        for name in [n for n in sys.modules if n.startswith("open_clip.")]:
            del sys.modules[name]


def open_clip_tower(path, convention: str = "openflamingo"):
    """open_clip's own VisionTransformer with the weights of an open_clip visual state dict file,
    returning the patch tokens as that open_clip version gave them to OpenFlamingo (`.visual(x)[1]`)."""
    post_layernorm, act = vision_convention(convention)
    transformer = open_clip_transformer()
    state = strip_visual_prefix(load_state_dict(path))
    config = open_clip_vision_config(state)
    tower = transformer.VisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        output_dim=state["proj"].shape[1] if "proj" in state else config.hidden_size,
        output_tokens=True,
        # final_ln_after_pool: ln_post on the pooled output only, so the tokens come before it.
        final_ln_after_pool=not post_layernorm,
        act_layer=nn.GELU if act == "gelu" else transformer.QuickGELU,
    )
    tower.load_state_dict(state)
    return tower.eval()


class _OpenClipLikeTower(nn.Module):
    """What OpenFlamingo reads from open_clip, from an HF CLIP: `.visual(x)[1]` = patch tokens,
    no CLS, before ln_post (or after it, as open_clip >= 2.23 gives them)."""

    def __init__(self, clip: CLIPVisionModel, post_layernorm: bool = False):
        super().__init__()
        self.clip = clip
        self.post_layernorm = post_layernorm

    def forward(self, pixel_values):
        output = self.clip(pixel_values=pixel_values)
        tokens = output.last_hidden_state
        if self.post_layernorm:
            tokens = getattr(self.clip, "vision_model", self.clip).post_layernorm(tokens)
        return output.pooler_output, tokens[:, 1:]


def open_flamingo_tokenizer(name_or_path, trust_remote_code: bool = False):
    """The tokenizer as OpenFlamingo's factory sets it up: `<|endofchunk|>` and `<image>` added, then
    `<PAD>` when it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


class _CacheUnderItsName:
    """Hands the LM the cache under the installed transformers' name: OpenFlamingo's Flamingo.forward
    passes `past_key_values=`, which transformers 5.24 renamed `cache`."""

    def forward(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs[CACHE_NAME] = kwargs.pop("past_key_values")
        return super().forward(*args, **kwargs)


class _MosaicGPTEmbeddings:
    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings


class _MosaicGPTOnTransformers5:
    """What MosaicGPT's own code (mosaicml/examples v0.0.4, written for transformers 4.x) needs to run
    under transformers 5 as it ran under 4.x; its code is not changed, only called differently."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # v0.0.4 never calls post_init(), which transformers 5's from_pretrained relies on (it reads
        # all_tied_weights_keys, set there); without it loading fails before any weight is used.
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # MosaicGPT keeps its own cache, a list of (key, value) tuples of shape (batch, seq, d_model), and
        # starts one itself when it gets none. With use_cache=True, generate would otherwise build a
        # DynamicCache from the config (which fails: MosaicGPTConfig has no num_hidden_layers) to hand in.
        return False

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        # OpenFlamingo's Flamingo.forward passes labels=None, which v0.0.4's forward has no argument for.
        if labels is not None:
            kwargs["labels"] = labels
        if attention_mask is not None:
            # v0.0.4 masks with ~attention_mask, which on the tokenizer's 0/1 integers is a bitwise not
            # that masked_fill refuses; its own prepare_inputs_for_generation casts to bool, as here.
            attention_mask = attention_mask.bool()
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # generate() keeps the cache the model returned under the installed transformers' name (5.24:
        # `cache`); MosaicGPT's own prepare_inputs_for_generation reads only past_key_values, and would
        # otherwise recompute the whole sequence at every step (same tokens, its cache never used).
        if CACHE_NAME != "past_key_values" and CACHE_NAME in kwargs:
            kwargs["past_key_values"] = kwargs.pop(CACHE_NAME)
        return super().prepare_inputs_for_generation(input_ids, **kwargs)


def _load_mosaic_gpt(language_model):
    """MosaicGPT's own code (remote code), loaded as AutoModelForCausalLM.from_pretrained(...,
    trust_remote_code=True) loads it, but as a subclass with _MosaicGPTOnTransformers5 first and
    GenerationMixin last. A class, not an instance, is extended here (unlike OpenFlamingo's
    extend_instance): its from_pretrained fails on transformers 5 before an instance exists, and
    GenerationMixin (transformers 5's PreTrainedModel has no generate) must come after MosaicGPT so
    that its own prepare_inputs_for_generation and _reorder_cache are the ones generate calls."""
    config = AutoConfig.from_pretrained(language_model, trust_remote_code=True)
    remote = get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], language_model)
    patched = type(remote.__name__, (_MosaicGPTOnTransformers5, remote, GenerationMixin), {})
    return patched.from_pretrained(language_model, config=config, dtype=torch.float32)


def build_open_flamingo(
    vision, language_model, cross_attn_every_n_layers: int, tokenizer=None, *, convention="openflamingo", open_clip_visual=None
):
    """OpenFlamingo's Flamingo around HF backbones, set up as its factory does (tokens, resize,
    freezing), its vision tower reading the patch tokens in the given convention: open_clip's own
    tower built from the open_clip_visual file when given, else the HF CLIP at `vision`.
    Returns (model, tokenizer)."""
    from .mosaic_gpt import is_mosaic_gpt, model_config_dict

    flamingo, flamingo_lm, utils = open_flamingo_modules()
    mosaic_gpt = is_mosaic_gpt(model_config_dict(language_model))
    tokenizer = open_flamingo_tokenizer(tokenizer or language_model, trust_remote_code=mosaic_gpt)
    if mosaic_gpt:
        # As OpenFlamingo's factory: MosaicGPT's own code, its blocks at transformer.blocks, and
        # get/set_input_embeddings (which it lacks) given to the instance.
        lang_encoder = _load_mosaic_gpt(language_model)
        utils.extend_instance(lang_encoder, _MosaicGPTEmbeddings)
        layers_path = "transformer.blocks"
    else:
        # float32, as OpenFlamingo's factory loaded it on transformers 4 (5 keeps the file's dtype).
        lang_encoder = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
        layers_path = decoder_layers_path(lang_encoder)
    utils.extend_instance(lang_encoder, flamingo_lm.FlamingoLMMixin)
    if not mosaic_gpt:  # MosaicGPT takes past_key_values on every transformers (_MosaicGPTOnTransformers5)
        utils.extend_instance(lang_encoder, _CacheUnderItsName)
    lang_encoder.set_decoder_layers_attr_name(layers_path)
    # The new rows' start is overwritten by the checkpoint (or, for rows it lacks, set as the converter sets them).
    lang_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    post_layernorm, act = vision_convention(convention)
    clip = CLIPVisionModel.from_pretrained(vision, dtype=torch.float32, **({"hidden_act": act} if act else {}))
    vision_encoder = nn.Module()
    if open_clip_visual is not None:
        vision_encoder.visual = open_clip_tower(open_clip_visual, convention)
    else:
        vision_encoder.visual = _OpenClipLikeTower(clip, post_layernorm)
    model = flamingo.Flamingo(
        vision_encoder,
        lang_encoder,
        tokenizer.encode("<|endofchunk|>")[-1],
        tokenizer.encode("<image>")[-1],
        vis_dim=clip.config.hidden_size,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model, tokenizer


def _under_transformers_5_names(checkpoint: dict, lang_encoder) -> dict:
    """The checkpoint's LM keys under the names transformers 5 keeps in memory (GPT-NeoX's `embed_out` is
    `lm_head`), so that OpenFlamingo's strict=False load places them as it did under transformers 4.

    OpenFlamingo's extend_instance re-made the LM's class outside transformers, which takes such a class
    for custom code and gives it no renames: they are looked up by the class's name, as transformers does."""
    renamings = get_checkpoint_conversion_mapping(type(lang_encoder).__name__) or []
    renamed = {}
    for key, tensor in checkpoint.items():
        if key.startswith("lang_encoder."):
            key = f"lang_encoder.{apply_renamings(key.removeprefix('lang_encoder.'), renamings)}"
        renamed[key] = tensor
    return renamed


def probe_inputs(tokenizer, image_size: int, seed: int = 0):
    """Two prompts, left-padded, with text before the first image and several images each."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer.padding_side = "left"
    text = [
        "글 먼저<image>빨간색 원<|endofchunk|><image>파란색",
        "<image>Output: a photo<|endofchunk|><image>Output:",
    ]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    vision_x = torch.randn(2, 2, 1, 3, image_size, image_size, generator=generator)
    return vision_x, batch["input_ids"], batch["attention_mask"]


def compare_with_open_flamingo(
    folder,
    checkpoint,
    vision,
    language_model,
    cross_attn_every_n_layers,
    *,
    tokenizer=None,
    initialised_from_row=None,
    convention="openflamingo",
    open_clip_visual=None,
):
    """Largest |logits difference| between the converted folder and OpenFlamingo loaded with the
    checkpoint (strict=False, as OpenFlamingo loads it) on a fixed probe; raises AssertionError if
    their greedy or beam-search generations differ. initialised_from_row: where the converter set
    output rows the checkpoint lacks to the mean of the rows before it; the reference gets the same."""
    from ..modeling_flaminko import FlaminkoForConditionalGeneration

    reference, reference_tokenizer = build_open_flamingo(
        vision, language_model, cross_attn_every_n_layers, tokenizer, convention=convention, open_clip_visual=open_clip_visual
    )
    reference.load_state_dict(_under_transformers_5_names(checkpoint, reference.lang_encoder), strict=False)
    reference.eval()
    if initialised_from_row is not None:
        with torch.no_grad():
            output = reference.lang_encoder.get_output_embeddings().weight
            output[initialised_from_row:] = output[:initialised_from_row].mean(0)
    image_size = CLIPVisionModel.config_class.from_pretrained(vision).image_size
    vision_x, input_ids, attention_mask = probe_inputs(reference_tokenizer, image_size)
    settings = [{"num_beams": 1}, {"num_beams": 3}]
    # <image> suppressed in both, as OpenFlamingo's evaluation does: no image stands behind a generated one.
    common = {
        "max_new_tokens": 8,
        "eos_token_id": reference.eoc_token_id,
        "pad_token_id": reference_tokenizer.pad_token_id,
        "suppress_tokens": [reference.media_token_id],
    }
    with torch.no_grad():
        expected = reference(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask).logits
        expected_tokens = [
            reference.generate(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask, **common, **setting)
            for setting in settings
        ]
    del reference
    model = FlaminkoForConditionalGeneration.from_pretrained(folder).eval()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": vision_x}
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = [model.generate(**inputs, **common, **setting) for setting in settings]
    for setting, ours, theirs in zip(settings, tokens, expected_tokens):
        if not torch.equal(ours, theirs):
            raise AssertionError(f"Generations differ with {setting}: {ours.tolist()} vs OpenFlamingo {theirs.tolist()}")
    real = attention_mask.bool()
    return (logits[real] - expected[real]).abs().max().item()
