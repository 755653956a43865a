"""Flaminko: Flamingo (a frozen CLIP vision tower, a Perceiver resampler and gated cross-attention
blocks) in front of an untouched Hugging Face causal LM.

The LM keeps its own module tree and parameter names. Each gated cross-attention block lives on
this model and runs as a forward pre-hook of the decoder layer it precedes; the media of a call
reach the hook as a keyword argument that the LM passes down to its layers. Nothing about a call
is stored on the model, so threads, nested calls and gradient checkpointing see only their own
media.

Shipped to the Hub as remote code: imports only torch, transformers and sibling files.
"""

import contextvars
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask
import transformers.initialization as init
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

if torch.distributed.is_available():
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from .checkpoint_mapping_flaminko import decoder_layers_path, is_open_flamingo_state_dict, load_open_flamingo_state_dict
from .configuration_flaminko import (
    CACHE_NAME,
    FlaminkoConfig,
    cache_field_named_by_transformers,
    quantization_config_skipping,
)
from .input_checks_flaminko import (
    check_clip_vision_tower,
    check_context,
    check_frame_count,
    check_image_batch,
    check_image_embedding_is_unique,
    check_image_token_count,
    check_local_path,
    check_media_inputs,
    check_media_key_values,
    check_not_both,
    check_score_inputs,
    check_text_inputs,
    checked_image_features,
    checked_pixel_values,
    is_prompt,
    take_cache,
)
from .processing_flaminko import FlaminkoProcessor

# The keyword under which a call's media travel from this model through the LM to its layers.
MEDIA_KWARG = "flaminko_media"
# Families whose models call their decoder layers without the forward's keyword arguments: their
# media travel in a context variable instead (per thread and per nested call, like the keyword).
LAYERS_WITHOUT_KWARGS = ("gptj", "mpt")
_MEDIA_OF_THIS_CALL: contextvars.ContextVar = contextvars.ContextVar("flaminko_media", default=None)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _attention_implementation(config: FlaminkoConfig) -> str:
    implementation = config._attn_implementation or "eager"
    # Flash kernels take only 2-D padding masks; the media mask is per token, so they fall back to SDPA
    # (whose own flash kernel still runs where no mask is needed).
    return "sdpa" if "flash" in implementation else implementation


def _attention_function(implementation: str):
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


def media_mask_for_attention(
    allowed: torch.Tensor, implementation: str, dtype: torch.dtype, rows_per_prompt: int = 1
):
    """allowed (B, 1, T, K), True where a token may attend to a latent -> the mask the cross-attention's
    implementation takes, in its query layout (B / s, 1, s * T, K) for s = rows_per_prompt (see
    FlaminkoCrossAttention): boolean for SDPA (whose fused memory-efficient and cuDNN kernels accept
    it), a BlockMask for flex attention (blocks no token may see are skipped), additive for eager.
    Built once per forward, for every gated block."""
    if rows_per_prompt > 1:
        allowed = allowed.view(-1, rows_per_prompt, *allowed.shape[1:]).transpose(1, 2).flatten(2, 3)
    if implementation == "sdpa":
        return allowed
    if implementation == "flex_attention":
        batch, _, queries, keys = allowed.shape
        return create_block_mask(
            lambda b, h, q, k: allowed[b, 0, q, k], batch, None, queries, keys, device=allowed.device
        )
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H * d) -> (B, H, S, d)"""
    batch, length, _ = x.shape
    return x.view(batch, length, num_heads, -1).transpose(1, 2)


class FlaminkoFeedForward(nn.Module):
    def __init__(self, *, dim: int, mult: int, act: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, dim * mult, bias=False)
        self.act = ACT2FN[act]
        self.down_proj = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(self.norm(x))))


class FlaminkoPerceiverAttention(nn.Module):
    """Latents attend to the media and to themselves (keys/values = media + latents)."""

    def __init__(self, config: FlaminkoConfig):
        super().__init__()
        self.config = config
        dim = config.vision_config.hidden_size
        self.num_heads = config.perceiver_heads
        inner_dim = config.perceiver_heads * config.perceiver_dim_head
        self.scaling = config.perceiver_dim_head**-0.5
        self.is_causal = False
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (N, S, D), latents (N, L, D) -> (N, L, D)"""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        query = _split_heads(self.to_q(latents), self.num_heads)
        key, value = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        key, value = _split_heads(key, self.num_heads), _split_heads(value, self.num_heads)
        attention = _attention_function(_attention_implementation(self.config))
        output, _ = attention(self, query, key, value, None, scaling=self.scaling, dropout=0.0)
        return self.to_out(output.flatten(2))


class FlaminkoPerceiverLayer(nn.Module):
    def __init__(self, config: FlaminkoConfig):
        super().__init__()
        self.attention = FlaminkoPerceiverAttention(config)
        self.feed_forward = FlaminkoFeedForward(
            dim=config.vision_config.hidden_size, mult=config.perceiver_ff_mult, act=config.perceiver_ff_act
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attention(media, latents) + latents
        return self.feed_forward(latents) + latents


class FlaminkoPerceiverResampler(nn.Module):
    """Turns the patch tokens of each image (all its frames) into a fixed number of latents."""

    def __init__(self, config: FlaminkoConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.empty(config.perceiver_num_latents, dim))
        if config.max_num_frames is None:
            self.frame_embeddings = None
        else:
            self.frame_embeddings = nn.Parameter(torch.empty(config.max_num_frames, dim))
        self.layers = nn.ModuleList([FlaminkoPerceiverLayer(config) for _ in range(config.perceiver_depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """patch_features (B, T_img, F, V, D) -> latents (B, T_img, L, D); each image resampled alone."""
        batch, num_images, num_frames, num_patches, dim = patch_features.shape
        if self.frame_embeddings is not None:
            check_frame_count(num_frames, self.frame_embeddings.shape[0])
            patch_features = patch_features + self.frame_embeddings[:num_frames, None, :]
        media = patch_features.reshape(batch * num_images, num_frames * num_patches, dim)
        latents = self.latents.expand(batch * num_images, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents).view(batch, num_images, -1, dim)


class FlaminkoCrossAttention(nn.Module):
    """Text tokens attend to the latents of the images the media mask allows."""

    def __init__(self, config: FlaminkoConfig):
        super().__init__()
        self.config = config
        text_dim = config.text_config.hidden_size
        vision_dim = config.vision_config.hidden_size
        self.num_heads = config.cross_attn_heads
        inner_dim = config.cross_attn_heads * config.cross_attn_dim_head
        self.scaling = config.cross_attn_dim_head**-0.5
        self.is_causal = False
        self.norm = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(vision_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, text_dim, bias=False)

    def project_media(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_features (B, T_img * L, Dv) -> keys, values (B, H, T_img * L, d)"""
        key, value = self.to_kv(image_features).chunk(2, dim=-1)
        return _split_heads(key, self.num_heads), _split_heads(value, self.num_heads)

    def forward(self, hidden_states, key, value, attention_mask, has_media) -> torch.Tensor:
        """hidden_states (B, T, D); key, value (B / s, H, T_img * L, d); attention_mask from
        media_mask_for_attention (B / s, 1, s * T, T_img * L), or None where every token may attend to
        every latent; has_media (B, T, 1). s > 1 when the s sequences of a prompt (beams, returned
        sequences) share its media: their queries then attend together, as s * T positions of one row."""
        batch, length, _ = hidden_states.shape
        shared = batch // key.shape[0]
        query = _split_heads(self.to_q(self.norm(hidden_states)), self.num_heads)
        if shared > 1:
            query = query.view(-1, shared, *query.shape[1:]).transpose(1, 2).flatten(2, 3)
        attention = _attention_function(_attention_implementation(self.config))
        output, _ = attention(self, query, key, value, attention_mask, scaling=self.scaling)
        # (B / s, s * T, H, d) -> (B, T, H * d)
        output = output.reshape(batch, length, -1)
        # Tokens before the first image get no visual signal (their rows are zeroed, as in OpenFlamingo).
        return self.to_out(output * has_media.to(output.dtype))


class FlaminkoGatedCrossAttentionBlock(GradientCheckpointingLayer):
    """x + tanh(attn_gate) * cross_attn(x, media); then x + tanh(ff_gate) * ff(x). Zero gates: identity.

    Under gradient checkpointing it is recomputed in the backward pass like the decoder layers; the
    media keys and values it reads are inputs, projected once per call, not per decoding step."""

    def __init__(self, config: FlaminkoConfig):
        super().__init__()
        self.attn = FlaminkoCrossAttention(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FlaminkoFeedForward(
            dim=config.text_config.hidden_size, mult=config.cross_attn_ff_mult, act=config.cross_attn_ff_act
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def project_media(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's media keys and values. A method of the block itself, so that FSDP2 can gather
        the weights of a sharded block for it as it does for forward (see _register_project_media_with_fsdp)."""
        return self.attn.project_media(image_features)

    def forward(self, hidden_states, key=None, value=None, attention_mask=None, has_media=None) -> torch.Tensor:
        if key is not None:
            attended = self.attn(hidden_states, key, value, attention_mask, has_media)
            hidden_states = attended * self.attn_gate.tanh() + hidden_states
        return self.ff(hidden_states) * self.ff_gate.tanh() + hidden_states


class FlaminkoMedia:
    """The media of one forward call, handed to the decoder layers' pre-hooks through the LM.

    key_values maps a decoder layer index to that block's projected media keys and values;
    empty when the call has no images (the gated feed-forward still runs).
    """

    def __init__(self, key_values: dict, attention_mask=None, has_media=None):
        self.key_values = key_values
        self.attention_mask = attention_mask
        self.has_media = has_media
        self.layers_reached = 0


class _RouteMedia:
    """Forward pre-hook of a decoder layer: takes the call's media out of the layer's keyword
    arguments and, where a gated block stands before this layer, applies it to the hidden states.

    The block is looked up in the model's ModuleDict at each call, so a wrapper put in its place
    (e.g. PEFT's modules_to_save) is the one that runs."""

    def __init__(self, layer_idx: int, blocks: nn.ModuleDict):
        self.layer_idx = layer_idx
        self.blocks = blocks

    def __call__(self, layer, args, kwargs):
        media = kwargs.pop(MEDIA_KWARG, None) or _MEDIA_OF_THIS_CALL.get()
        name = str(self.layer_idx)
        if media is None or name not in self.blocks:
            return args, kwargs
        block = self.blocks[name]
        media.layers_reached += 1
        key, value = media.key_values.get(self.layer_idx, (None, None))
        if args:
            args = (block(args[0], key, value, media.attention_mask, media.has_media), *args[1:])
        else:
            hidden_states = kwargs["hidden_states"]
            kwargs["hidden_states"] = block(hidden_states, key, value, media.attention_mask, media.has_media)
        return args, kwargs


class _KeepNewTokenRows:
    """Gradient hook of the embedding matrix: while the config freezes the LM, only the rows of
    <image> and <|endofchunk|> keep their gradient. Reads the config at each call, so a later
    change of the freezing settings takes effect."""

    def __init__(self, config: FlaminkoConfig):
        self.config = config

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if not (self.config.freeze_language_model and self.config.train_new_token_embeddings):
            return grad
        rows = [i for i in (self.config.media_token_id, self.config.eoc_token_id) if i is not None]
        mask = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        mask[rows] = 1
        return grad * mask


def _register_project_media_with_fsdp(blocks):
    """FSDP2 (`fully_shard`, as accelerate's FSDP config applies it to the gated blocks) gathers a
    sharded module's weights around its forward only, and the media keys and values are projected
    once per call outside it (not per decoding step): their method is registered as a forward method of each
    sharded block, once (registering wraps the method on the instance)."""
    if not torch.distributed.is_available():
        return
    for block in blocks:
        if isinstance(block, FSDPModule) and "project_media" not in vars(block):
            register_fsdp_forward_method(block, "project_media")


def decoder_layers(language_model: PreTrainedModel) -> nn.ModuleList:
    return language_model.get_submodule(decoder_layers_path(language_model))


def media_positions(input_ids: torch.LongTensor, media_token_id: int, past_count=None) -> torch.LongTensor:
    """For each token, the 1-based index of the latest <image> at or before it (0: none yet).

    The <image> token itself sees its image. past_count (B,) counts the <image> tokens of a cached prefix.
    """
    return image_token_positions(input_ids == media_token_id, past_count)


def image_token_positions(image_tokens: torch.BoolTensor, past_count=None) -> torch.LongTensor:
    """media_positions from a (B, T) mask of the <image> places (from input_ids or from inputs_embeds)."""
    positions = image_tokens.long().cumsum(-1)
    if past_count is not None:
        positions = positions + past_count.to(positions.device)[:, None]
    return positions


def media_attention_mask(
    positions: torch.LongTensor, num_images: int, num_latents: int, only_immediate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> mask (B, 1, T, num_images * num_latents), True where a token may attend
    to a latent; has_media (B, T, 1).

    Rows of tokens with no image yet are left open (never all masked, which gives NaN in SDPA) and
    zeroed by has_media after attention.
    """
    image_index = torch.arange(1, num_images + 1, device=positions.device).repeat_interleave(num_latents)
    if only_immediate:
        allowed = positions[..., None] == image_index
    else:
        allowed = positions[..., None] >= image_index
    has_media = positions > 0
    allowed = allowed | ~has_media[..., None]
    return allowed[:, None], has_media[..., None]


# MosaicGPT's QK LayerNorm (`attn_qk_ln`, in mpt-1b-redpajama-200b, OpenFlamingo-3B's LM): a
# LayerNorm over the full width on the query and the key thirds of Wqkv's output. transformers' MPT
# accepts `attn_config.qk_ln` but applies nothing, so Flaminko adds the two norms where MosaicGPT
# has them (`attn.q_ln`, `attn.k_ln`: the LM's own parameter names) and applies them to Wqkv's output.


class _MptQueryKeyLayerNorm:
    """Forward hook of an MPT attention's Wqkv: normalises the query and key thirds of its output."""

    def __init__(self, query_norm: nn.LayerNorm, key_norm: nn.LayerNorm):
        self.query_norm = query_norm
        self.key_norm = key_norm

    def __call__(self, module, args, output):
        query, key, value = output.chunk(3, dim=-1)
        return torch.cat([self.query_norm(query).to(query.dtype), self.key_norm(key).to(key.dtype), value], dim=-1)


def add_mpt_query_key_layernorm(language_model: PreTrainedModel):
    """Gives an MPT LM whose config asks for QK LayerNorm (attn_config.qk_ln) its q_ln / k_ln, bias-free
    as MPT's other norms; any other LM is left as it is."""
    config = language_model.config
    if config.model_type != "mpt" or not config.attn_config.qk_ln:
        return
    if config.attn_config.clip_qkv:
        # MosaicGPT clips Wqkv's output before the norms; transformers' MPT clips after this hook.
        raise ValueError("An MPT LM with both attn_config.qk_ln and attn_config.clip_qkv is not supported")
    for block in decoder_layers(language_model):
        attention = block.attn
        if hasattr(attention, "q_ln"):
            continue
        attention.q_ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=False)
        attention.k_ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=False)
        attention.Wqkv.register_forward_hook(_MptQueryKeyLayerNorm(attention.q_ln, attention.k_ln))


@dataclass
@cache_field_named_by_transformers
class FlaminkoModelOutputWithPast(ModelOutput):
    """
    last_hidden_state: (B, T, D_text) the LM's final hidden states (after its last norm), before its output layer.
    image_outputs, image_features, media_key_values, image_token_count: as in FlaminkoCausalLMOutputWithPast.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    image_features: torch.FloatTensor | None = None
    media_key_values: tuple[tuple[torch.FloatTensor, torch.FloatTensor], ...] | None = None
    image_token_count: torch.LongTensor | None = None


@dataclass
@cache_field_named_by_transformers
class FlaminkoCausalLMOutputWithPast(ModelOutput):
    """
    image_outputs: get_image_features' output for the call's pixel_values (None when none were given).
    image_features: (B, T_img * L, D_vision) resampled latents of the call's images, as
        get_image_features' pooler_output.
    media_key_values: per gated block (in layer order), the projected media keys and values;
        pass them back with image_features to skip that work in later calls.
    image_token_count: (B,) <image> tokens seen up to the end of this call, including the cache;
        pass it as past_image_token_count when decoding with a cache by hand.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    image_features: torch.FloatTensor | None = None
    media_key_values: tuple[tuple[torch.FloatTensor, torch.FloatTensor], ...] | None = None
    image_token_count: torch.LongTensor | None = None


class FlaminkoPreTrainedModel(PreTrainedModel):
    config: FlaminkoConfig
    config_class = FlaminkoConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlaminkoGatedCrossAttentionBlock", "FlaminkoPerceiverLayer"]
    # Kept in full precision when from_pretrained gets a quantization_config without a skip list of
    # its own: the vision tower and the resampler run once per generate call (quantizing them saves
    # no decoding time and shifts every image feature), the gated blocks and the resampler are what
    # fine-tuning trains (a quantized LM under them trains as in QLoRA), and the output layer picks
    # each token. Not `_keep_in_fp32_modules`, which would also keep them fp32 in a float16 load.
    _modules_not_to_quantize = ["vision_model", "perceiver", "cross_attn_layers", "language_model.lm_head"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The decoding step traces whole under a StaticCache (checks that read tensor values run on the
    # prompt only). Not for LMs whose media travel in a context variable: see __init__.
    _can_compile_fullgraph = True

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: Flaminko initialises through transformers.initialization, as transformers' own
        models do. For custom code transformers skips every module without parameters of its own
        (written for remote code that sets weights in place), and so on the meta-device loading path
        never runs CLIP's initialisation of its attention and MLP weights, which sits on those modules."""
        return False

    def _init_weights(self, module):
        if isinstance(module, FlaminkoPerceiverResampler):
            init.normal_(module.latents)
            if module.frame_embeddings is not None:
                init.normal_(module.frame_embeddings, std=self.config.initializer_range)
        elif isinstance(module, FlaminkoGatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        else:
            super()._init_weights(module)


class FlaminkoLanguageModelBody(nn.Module):
    """A causal LM's body: its base model (embeddings, decoder layers, final norm), without the output
    layer, under the attribute the LM keeps it under (gpt_neox, model, transformer...), so that its
    parameters have the LM's own names. FlaminkoModel's weights are FlaminkoForConditionalGeneration's
    less the output layer. It stands for the LM's base model (its config, its attention support...), as
    the `language_model` of transformers' composite models is the LM's base model."""

    def __init__(self, language_model: PreTrainedModel):
        super().__init__()
        self.body_name = language_model.base_model_prefix
        setattr(self, self.body_name, language_model.base_model)
        # transformers gathers a composite model's parallel plans from its children, by the children's names.
        for plan in ("_tp_plan", "_ep_plan", "_pp_plan", "_fsdp_plan"):
            entries = getattr(self.body, plan, None) or {}
            setattr(self, plan, {f"{self.body_name}.{name}": value for name, value in entries.items()})

    @property
    def body(self) -> PreTrainedModel:
        return getattr(self, self.body_name)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Nothing to forward to before __init__ names the body: DeepSpeed's zero.Init looks attributes up
            # as it enters __init__, and forwarding would ask for the body again, without end.
            if "body_name" not in self.__dict__:
                raise
            return getattr(self.body, name)

    def forward(self, **kwargs):
        return self.body(**kwargs)


class FlaminkoModel(FlaminkoPreTrainedModel):
    """CLIP vision tower -> Perceiver resampler -> gated cross-attention in front of a causal LM's body:
    transformers' base model, returning the LM's last hidden states (no output layer, no logits).

    `vision_model` and `language_model` (a causal LM, of which the body is kept) may be given prebuilt
    (e.g. pretrained); otherwise they are built from the config.
    """

    def __init__(self, config: FlaminkoConfig, *, vision_model=None, language_model=None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.perceiver = FlaminkoPerceiverResampler(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = self._kept_part_of(language_model)
        add_mpt_query_key_layernorm(self.language_model)
        self.cross_attn_layers = nn.ModuleDict(
            {str(i): FlaminkoGatedCrossAttentionBlock(config) for i in config.cross_attn_layer_indices}
        )
        for i, layer in enumerate(decoder_layers(self.language_model)):
            layer.register_forward_pre_hook(_RouteMedia(i, self.cross_attn_layers), with_kwargs=True)
        self._set_compile_support()
        self.post_init()
        self.apply_freezing()

    @staticmethod
    def _kept_part_of(language_model: PreTrainedModel) -> nn.Module:
        """The part of the causal LM this model keeps: its body, without the output layer."""
        return FlaminkoLanguageModelBody(language_model)

    def _set_compile_support(self):
        if self.config.text_config.model_type in LAYERS_WITHOUT_KWARGS:
            # Dynamo cannot trace ContextVar.set: the step breaks the graph there.
            self._can_compile_fullgraph = False

    @classmethod
    def _made_of_modules_of(cls, model: "FlaminkoForConditionalGeneration") -> "FlaminkoModel":
        """A FlaminkoModel made of `model`'s own modules (the LM's body in place of the whole LM): its
        parameters are the model's, under the same names, and the media already reach its gated blocks."""
        # Built by hand, not through __init__: the modules are there, initialised (or trained), frozen
        # as the caller left them (by PEFT, say), their decoder layers already routing the media.
        view = cls.__new__(cls)
        FlaminkoPreTrainedModel.__init__(view, model.config)
        view.vision_model = model.vision_model
        view.perceiver = model.perceiver
        view.language_model = FlaminkoLanguageModelBody(model.language_model)
        view.cross_attn_layers = model.cross_attn_layers
        view._set_compile_support()
        with init.no_init_weights():
            view.post_init()
        return view

    def _is_made_of_modules_of(self, model) -> bool:
        """Whether this model is still made of `model`'s modules (none has been replaced on either since)."""
        mine = (self.vision_model, self.perceiver, self.language_model.body, self.cross_attn_layers)
        theirs = (model.vision_model, model.perceiver, model.language_model.base_model, model.cross_attn_layers)
        return all(a is b for a, b in zip(mine, theirs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_local_path(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = quantization_config_skipping(kwargs["quantization_config"], cls._modules_not_to_quantize)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # With output_loading_info=True: (model, loading_info).
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading materialises fresh parameters, which forget requires_grad.
        model.apply_freezing()
        return loaded

    def apply_freezing(self):
        """Set requires_grad from the config (OpenFlamingo's default: only the resampler, the
        gated blocks and the <image>/<|endofchunk|> embedding rows train)."""
        config = self.config
        for module, trainable in (
            (self.vision_model, not config.freeze_vision_model),
            (self.language_model, not config.freeze_language_model),
            (self.perceiver, True),
            (self.cross_attn_layers, True),
        ):
            for parameter in module.parameters():
                # Integer weights of a quantized layer (bitsandbytes) cannot take gradients: they stay frozen.
                if parameter.is_floating_point():
                    parameter.requires_grad_(trainable)
        if config.freeze_language_model and config.train_new_token_embeddings:
            self.get_input_embeddings().requires_grad_(True)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _restrict_embedding_gradients(self):
        """The row mask lives on the embedding parameter itself, so a reloaded or resized matrix
        (a new parameter) gets its own the first time it is used."""
        weight = self.get_input_embeddings().weight
        # A PEFT token wrapper computes its weight anew each call and trains its own rows.
        if not isinstance(weight, nn.Parameter):
            return
        if weight.requires_grad and not getattr(weight, "_flaminko_rows_hooked", False):
            weight.register_hook(_KeepNewTokenRows(self.config))
            weight._flaminko_rows_hooked = True

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple | BaseModelOutputWithPooling:
        """pixel_values (B, T_img, C, H, W) or (B, T_img, F, C, H, W) -> the resampled latents as
        `pooler_output` (B, T_img * L, D_vision), the vision tokens the resampler reads as
        `last_hidden_state` (B, T_img, F, V, D_vision) and, when asked for (output_hidden_states,
        output_attentions), the vision tower's hidden states and attentions, one row per frame.

        pooler_output is one 2-D array per sample, its images' latents in order, as transformers'
        multi-image models (Idefics2/3) give theirs; forward and generate take it back as image_features."""
        pixel_values = checked_pixel_values(pixel_values, self.config.vision_config)
        batch, num_images, num_frames, channels, height, width = pixel_values.shape
        trainable = any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            flat = pixel_values.reshape(-1, channels, height, width).to(self.vision_model.dtype)
            vision_outputs = self.vision_model(pixel_values=flat, return_dict=True, **kwargs)
            patches = vision_outputs.last_hidden_state
            if self.config.vision_feature_post_layernorm:
                patches = self.vision_model.post_layernorm(patches)
            if not self.config.vision_feature_include_cls:
                patches = patches[:, 1:]
        patches = patches.reshape(batch, num_images, num_frames, patches.shape[1], patches.shape[2])
        return BaseModelOutputWithPooling(
            last_hidden_state=patches,
            pooler_output=self.perceiver(patches).flatten(1, 2),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def project_media(self, image_features: torch.Tensor) -> tuple:
        """The media keys and values of every gated block, in layer order."""
        blocks = list(self.cross_attn_layers.values())
        # Every block inside, also those a wrapper holds (peft's modules_to_save keeps trained copies).
        _register_project_media_with_fsdp(
            module for module in self.cross_attn_layers.modules() if isinstance(module, FlaminkoGatedCrossAttentionBlock)
        )
        return tuple(block.project_media(image_features) for block in blocks)

    def _build_media(
        self, image_tokens, image_features, media_key_values, past_image_token_count, prompt, media_expansion
    ):
        """image_tokens: (B, T) True at the <image> places, None when config.media_token_id is not set."""
        check_media_inputs(image_tokens, image_features, past_image_token_count, prompt)
        if image_features is None:
            return FlaminkoMedia({}), None
        positions = image_token_positions(image_tokens, past_image_token_count)
        num_latents = self.config.perceiver_num_latents
        num_images = image_features.shape[1] // num_latents
        check_image_token_count(positions, num_images, prompt)
        if media_key_values is None:
            media_key_values = self.project_media(image_features)
        else:
            check_media_key_values(media_key_values, len(self.cross_attn_layers))
        allowed, has_media = media_attention_mask(
            positions, num_images, num_latents, self.config.only_attend_immediate_media
        )
        # With one image every token may see it (tokens before it are zeroed after attention): with no
        # mask, SDPA may pick its flash kernel.
        mask = None
        if num_images > 1:
            implementation = _attention_implementation(self.config)
            dtype = self.get_input_embeddings().weight.dtype
            mask = media_mask_for_attention(allowed, implementation, dtype, rows_per_prompt=media_expansion)
        key_values = {int(i): kv for i, kv in zip(self.cross_attn_layers.keys(), media_key_values)}
        return FlaminkoMedia(key_values, mask, has_media), media_key_values

    def _image_tokens(self, input_ids, inputs_embeds) -> torch.BoolTensor | None:
        """(B, T) True at the <image> places: its token id in input_ids, or its embedding row in
        inputs_embeds (as transformers' vision-language models find their placeholders)."""
        media_id = self.config.media_token_id
        if media_id is None:
            return None
        if input_ids is not None:
            return input_ids == media_id
        weight = self.get_input_embeddings().weight
        check_image_embedding_is_unique(weight, media_id)
        return (inputs_embeds == weight[media_id].to(inputs_embeds.dtype)).all(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        media_key_values: tuple | None = None,
        past_image_token_count: torch.LongTensor | None = None,
        media_expansion: int = 1,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlaminkoModelOutputWithPast:
        r"""
        pixel_values: (B, T_img, C, H, W) or (B, T_img, F, C, H, W); samples with fewer images are zero-padded.
        inputs_embeds: (B, T, D) for the LM instead of the embeddings of input_ids. Alone, the images go where the
            <image> token's embedding stands; with input_ids of the same (B, T), where their <image> tokens stand.
        image_features: (B, T_img * L, D_vision) resampled latents, the `image_features` of a previous call's
            output or `get_image_features`' pooler_output (instead of pixel_values).
        media_key_values: the media keys/values of a previous call's output (with image_features).
        cache: the LM's cache (`past_key_values` before transformers 5.24, still accepted).
        past_image_token_count: (B,) <image> tokens in the cached prefix, when the cache is given by hand.
        media_expansion: consecutive rows of input_ids per row of the media (generate's beams and returned
            sequences share their prompt's images, which are encoded and projected once).

        Checks the inputs, encodes the images and runs `language_model` (the causal LM, or its body without
        the output layer) with the call's media routed to the gated blocks.
        """
        cache = take_cache(cache, kwargs)
        prompt = is_prompt(cache)
        labels = kwargs.get("labels")
        check_text_inputs(input_ids, attention_mask, labels, prompt, inputs_embeds, self.get_input_embeddings())
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        check_not_both("pixel_values", pixel_values, "image_features", image_features)
        image_outputs = None
        if pixel_values is not None:
            asked = {name: kwargs[name] for name in ("output_hidden_states", "output_attentions") if name in kwargs}
            image_outputs = self.get_image_features(pixel_values, return_dict=True, **asked)
            image_features = image_outputs.pooler_output
            check_image_batch(pixel_values, image_features, batch, media_expansion)
            media_key_values = None
        elif image_features is not None:
            image_features = checked_image_features(image_features, self.config, batch, media_expansion, prompt)
        past_length = cache.get_seq_length() if cache is not None else 0
        check_context(past_length, length, self.config.text_config)
        image_tokens = self._image_tokens(input_ids, inputs_embeds)
        media, media_key_values = self._build_media(
            image_tokens, image_features, media_key_values, past_image_token_count, prompt, media_expansion
        )
        self._restrict_embedding_gradients()
        if self.config.text_config.model_type in LAYERS_WITHOUT_KWARGS:
            context = _MEDIA_OF_THIS_CALL.set(media)
        else:
            context = None
            kwargs[MEDIA_KWARG] = media
        try:
            outputs = self.language_model(
                # Given both, the ids have placed the images and the embeddings feed the LM.
                input_ids=input_ids if inputs_embeds is None else None,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                return_dict=True,
                **{CACHE_NAME: cache},
                **kwargs,
            )
        finally:
            if context is not None:
                _MEDIA_OF_THIS_CALL.reset(context)
        if len(self.cross_attn_layers) and media.layers_reached == 0:
            raise RuntimeError(
                f"{type(self.language_model).__name__} did not pass the media to its decoder layers; "
                "its layers must receive the keyword arguments of the model's forward"
            )
        image_token_count = None
        if image_tokens is not None:
            image_token_count = image_token_positions(image_tokens, past_image_token_count)[:, -1]
        return self._output_of(
            outputs,
            image_outputs=image_outputs,
            image_features=image_features,
            media_key_values=media_key_values,
            image_token_count=image_token_count,
        )

    def _output_of(self, outputs: ModelOutput, **media_fields) -> FlaminkoModelOutputWithPast:
        """This model's output from the LM's output (the body's hidden states) and the media fields."""
        return FlaminkoModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **media_fields,
        )


class FlaminkoForConditionalGeneration(FlaminkoModel, GenerationMixin):
    """CLIP vision tower -> Perceiver resampler -> gated cross-attention in front of a causal LM, kept
    whole (with its output layer) under `language_model`.

    `vision_model` and `language_model` may be given prebuilt (e.g. pretrained); otherwise they
    are built from the config.
    """

    base_model_prefix = "model"

    def __init__(self, config: FlaminkoConfig, *, vision_model=None, language_model=None):
        super().__init__(config, vision_model=vision_model, language_model=language_model)
        self._set_generation_defaults()

    @staticmethod
    def _kept_part_of(language_model: PreTrainedModel) -> nn.Module:
        """The whole causal LM, its output layer included."""
        return language_model

    @property
    def model(self) -> FlaminkoModel:
        """transformers' base model (`base_model`, through `base_model_prefix`): this model without the LM's
        output layer, returning the LM's last hidden states, which `get_output_embeddings()` turns into the
        logits. A view made of this model's own modules, not a submodule: the parameter names stay those of
        the LM (under `language_model.`) and of the Flamingo parts."""
        view = self.__dict__.get("_base_model_view")
        if view is None or not view._is_made_of_modules_of(self):
            view = FlaminkoModel._made_of_modules_of(self)
            # In the instance's own dict, not set as an attribute: a submodule would repeat every parameter.
            self.__dict__["_base_model_view"] = view
        return view

    def _set_generation_defaults(self):
        """<|endofchunk|> (and the LM's EOS) end generation; <image> is never generated, since no
        image would stand behind it."""
        config = self.config
        if self.generation_config is None:
            return
        if config.eoc_token_id is not None:
            text_eos = config.text_config.eos_token_id
            text_eos = text_eos if isinstance(text_eos, list) else [text_eos] if text_eos is not None else []
            self.generation_config.eos_token_id = [config.eoc_token_id, *text_eos]
        if config.media_token_id is not None:
            self.generation_config.suppress_tokens = [config.media_token_id]
        self.generation_config.pad_token_id = config.text_config.pad_token_id

    @classmethod
    def from_backbones(
        cls,
        vision_model_name_or_path,
        language_model_name_or_path,
        *,
        tokenizer_name_or_path=None,
        dtype=torch.float32,
        **config_kwargs,
    ):
        """A model with a pretrained CLIP vision tower and causal LM (Hub ids or folders) and a fresh
        resampler and gated cross-attention; returns (model, processor).

        The tokenizer comes from the LM unless tokenizer_name_or_path is given; config_kwargs go to
        FlaminkoConfig (e.g. cross_attn_every_n_layers=4). The whole model is built in `dtype`
        (float32 unless given, as OpenFlamingo builds it): the backbones' files name dtypes of their
        own (CLIP float32, mpt-7b bfloat16, LLaMA-7B float16), which transformers would otherwise keep.
        """
        check_local_path(vision_model_name_or_path, "vision_model_name_or_path")
        check_local_path(language_model_name_or_path, "language_model_name_or_path")
        check_clip_vision_tower(AutoConfig.from_pretrained(vision_model_name_or_path).model_type, vision_model_name_or_path)
        # The fresh resampler and gated blocks draw from the generator as it was before loading: under
        # DeepSpeed ZeRO-3 loading the vision tower draws from it, and ordinary loading does not.
        with torch.random.fork_rng(devices=[]):
            vision_model = CLIPVisionModel.from_pretrained(vision_model_name_or_path, dtype=dtype)
            language_model = AutoModelForCausalLM.from_pretrained(language_model_name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or language_model_name_or_path)
        tokenizer.padding_side = "left"
        image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path)
        processor = FlaminkoProcessor(image_processor=image_processor, tokenizer=tokenizer)
        config = FlaminkoConfig(
            vision_config=vision_model.config,
            text_config=language_model.config,
            media_token_id=processor.image_token_id,
            eoc_token_id=processor.end_of_chunk_token_id,
            **config_kwargs,
        )
        if config.max_num_frames is not None:
            processor.max_num_frames = config.max_num_frames
        model = cls(config, vision_model=vision_model, language_model=language_model)
        # Resized after construction, so that post_init never re-initialises the pretrained rows.
        # num_embeddings, not weight.shape: under DeepSpeed ZeRO-3 the loaded weight is partitioned, and
        # its shape on each rank is (0,) outside a forward.
        original_rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > original_rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model._init_new_token_rows(original_rows)
            model.apply_freezing()
        language_model.config.pad_token_id = tokenizer.pad_token_id
        model._set_generation_defaults()
        if dtype is not None:
            model.to(dtype)
        return model, processor

    def _init_new_token_rows(self, original_rows: int):
        """The rows of the added tokens start at the mean of the pretrained rows (input and output
        embeddings), a deterministic start that keeps their first logits ordinary."""
        output = self.get_output_embeddings()
        # Whole on every rank also under DeepSpeed ZeRO-3: resize_token_embeddings builds the resized
        # matrices as ordinary parameters, and the DeepSpeed engine partitions them when it starts.
        with torch.no_grad():
            for weight in {self.get_input_embeddings().weight, *([output.weight] if output is not None else [])}:
                weight[original_rows:] = weight[:original_rows].mean(0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes OpenFlamingo's checkpoint layout (`lang_encoder.*`, `perceiver.layers.i.0.*`),
        so OpenFlamingo code that loads a checkpoint.pt into the model runs unchanged. Such a state
        dict is placed key by key; a key with no place or a weight it leaves unfilled is an error.
        The buffers a transformers 4.x checkpoint carries are checked against what the model
        computes and left out, as `flaminko convert` does."""
        if is_open_flamingo_state_dict(state_dict):
            load_open_flamingo_state_dict(self, state_dict)
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # register_for_auto_class records one auto class; the saved code serves these two as well.
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_flaminko.FlaminkoForConditionalGeneration",
                "AutoProcessor": "processing_flaminko.FlaminkoProcessor",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        media_key_values: tuple | None = None,
        past_image_token_count: torch.LongTensor | None = None,
        media_expansion: int = 1,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlaminkoCausalLMOutputWithPast:
        r"""FlaminkoModel.forward (see its arguments); labels (B, T) give the LM's loss, logits_to_keep limits the
        logits to the last positions (generate's prefill)."""
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if labels is not None:
            kwargs["labels"] = labels
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            image_features=image_features,
            media_key_values=media_key_values,
            past_image_token_count=past_image_token_count,
            media_expansion=media_expansion,
            use_cache=use_cache,
            **kwargs,
        )

    def _output_of(self, outputs: ModelOutput, **media_fields) -> FlaminkoCausalLMOutputWithPast:
        """The causal LM's loss and logits, with the media fields."""
        return FlaminkoCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **media_fields,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        pixel_values=None,
        image_features=None,
        media_key_values=None,
        inputs_embeds=None,
        prompt_image_token_count=None,
        past_key_values=None,
        **kwargs,
    ):
        """prompt_image_token_count: (B,) <image> tokens of a prompt given as inputs_embeds, whose
        tokens are not in input_ids (generate sets it to 0 when the prompt's ids come with its
        embeddings). past_key_values: the cache under its name before transformers 5.24, named here
        because generate checks the arguments it is given (an assistant model's own cache among them)
        against this signature."""
        if past_key_values is not None:
            kwargs[CACHE_NAME] = past_key_values
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            image_features=image_features,
            media_key_values=media_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        # Flamingo reads its media at every step: transformers drops pixel_values after the prefill,
        # and an assistant model's every round of drafting starts as a continuation, so they are kept
        # until this generate call's image features replace them.
        if image_features is None and pixel_values is not None:
            model_inputs["pixel_values"] = pixel_values
        # A prompt given as both ids and embeddings (of one length, see generate): the embeddings feed the
        # LM, the ids place the images, as transformers' decoder-only models keep them for the output.
        prompt_embeds = model_inputs.get("inputs_embeds")
        if prompt_embeds is not None and input_ids.shape[1] == inputs_embeds.shape[1]:
            model_inputs["input_ids"] = input_ids[:, input_ids.shape[1] - prompt_embeds.shape[1] :].clone()
        if self.config.media_token_id is not None and model_inputs.get("input_ids") is not None:
            cached = input_ids.shape[1] - model_inputs["input_ids"].shape[1]
            past = (input_ids[:, :cached] == self.config.media_token_id).sum(-1)
            if prompt_image_token_count is not None:
                past = past + prompt_image_token_count
            model_inputs["past_image_token_count"] = past
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # The images are encoded and projected once per generate call, then reused at every step.
        if outputs.image_features is not None:
            model_kwargs["image_features"] = outputs.image_features
            model_kwargs["media_key_values"] = outputs.media_key_values
            model_kwargs.pop("pixel_values", None)
        if model_kwargs.get("inputs_embeds") is not None and "prompt_image_token_count" not in model_kwargs:
            model_kwargs["prompt_image_token_count"] = outputs.image_token_count
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # The beams and returned sequences of a prompt share its images: left unexpanded, they are
        # encoded, resampled and projected once per prompt, not once per sequence.
        media = {
            key: model_kwargs.pop(key) for key in ("pixel_values", "image_features") if model_kwargs.get(key) is not None
        }
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(media)
        if media and expand_size > 1:
            model_kwargs["media_expansion"] = expand_size
        return input_ids, model_kwargs

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        media_key_values: tuple | None = None,
        candidates_per_prompt: int = 1,
        length_normalize: bool = False,
    ) -> torch.FloatTensor:
        """Log-likelihood of each row's candidate tokens (where `labels` != -100; labels aligned with
        input_ids, as for training), summed or, with length_normalize, averaged: shape (rows,).

        Rows come in groups of `candidates_per_prompt` consecutive rows (one prompt, several candidate
        continuations) sharing one row of pixel_values or image_features, which are encoded, resampled
        and projected to media keys/values once per group, in one forward. Right-pad the rows: the
        candidates then sit at the same positions as in an unpadded forward of each.
        """
        check_score_inputs(input_ids, labels, candidates_per_prompt)
        logits = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_features=image_features,
            media_key_values=media_key_values,
            media_expansion=candidates_per_prompt,
            use_cache=False,
        ).logits[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        log_probs = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = torch.where(scored, log_probs, 0.0).sum(-1)
        return total / scored.sum(-1).clamp(min=1) if length_normalize else total

    def generate(self, inputs=None, *, vision_x=None, lang_x=None, **kwargs):
        """GenerationMixin.generate; also takes OpenFlamingo's vision_x (B, T_img, F, C, H, W) and lang_x."""
        if lang_x is not None:
            check_not_both("lang_x", lang_x, "input_ids", kwargs.get("input_ids") if inputs is None else inputs)
            kwargs["input_ids"] = lang_x
        if vision_x is not None:
            check_not_both("vision_x", vision_x, "pixel_values", kwargs.get("pixel_values"))
            kwargs["pixel_values"] = vision_x
        # Checked here, once: GenerationMixin derives position ids and the cache from the prompt
        # before the first forward, and would fail deep inside the LM on a malformed one.
        prompt_ids = kwargs.get("input_ids") if inputs is None else inputs
        inputs_embeds = kwargs.get("inputs_embeds")
        if prompt_ids is not None and inputs_embeds is not None:
            # The prompt's <image> tokens are counted in its ids, which generate keeps: none come from elsewhere.
            kwargs.setdefault("prompt_image_token_count", 0)
        # Without a prompt, GenerationMixin starts from BOS.
        if prompt_ids is not None or inputs_embeds is not None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            check_text_inputs(
                prompt_ids, kwargs.get("attention_mask"), None, is_prompt(cache), inputs_embeds, self.get_input_embeddings()
            )
        return super().generate(inputs, **kwargs)


__all__ = [
    "FlaminkoForConditionalGeneration",
    "FlaminkoModel",
    "FlaminkoPreTrainedModel",
    "FlaminkoCausalLMOutputWithPast",
    "FlaminkoModelOutputWithPast",
]
