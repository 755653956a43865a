"""The checks of what Flaminko's model is given, kept in one place: types and shapes on every call,
tensor values (token ids, NaNs, <image> counts) on the prompt only. Each raises a ValueError or
TypeError naming the problem, where torch would fail deep inside with a shape error or give a silent
wrong answer. None reads the model's state: what they check against (configs, the input
embeddings, the number of gated blocks) comes as arguments.

Shipped beside the model as remote code: imports only torch, transformers and sibling files.
"""

import os
import warnings

import torch
from torch import nn

from .configuration_flaminko import CACHE_NAME


def is_prompt(cache) -> bool:
    """Whether a call runs a prompt (nothing cached yet): the checks that read tensor values run
    then, and never in a decoding step (under torch.compile every call counts as a decoding step)."""
    if cache is None:
        return True
    if torch.compiler.is_compiling():
        return False
    # A static cache counts its filled slots as a tensor once it holds tokens: only a prompt gets an int 0.
    length = cache.get_seq_length()
    return isinstance(length, int) and length == 0


def language_model_context(text_config) -> int | None:
    """The most tokens the LM takes: max_position_embeddings, or the longer context its RoPE parameters set
    up (original_max_position_embeddings, max_position_embeddings when not given, times a scaling factor)."""
    context = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None)
    if context is None or not isinstance(rope, dict):
        return context
    factor = rope.get("factor", 1.0) if rope.get("rope_type", "default") != "default" else 1.0
    original = rope.get("original_max_position_embeddings", context)
    if not isinstance(factor, (int, float)) or not isinstance(original, int):
        return context
    return max(context, int(original * factor))


def _reads_values(prompt: bool) -> bool:
    """Whether a check may read tensor values: on the prompt only, and never while compiling, since a
    check per decoding step would stall the device on a host sync."""
    return prompt and not torch.compiler.is_compiling()


def _describe_tensor(value) -> str:
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_not_both(first: str, first_value, second: str, second_value):
    if first_value is not None and second_value is not None:
        raise ValueError(f"Pass {first} or {second}, not both")


def check_local_path(name_or_path, argument: str):
    """A folder path that does not exist is named as such (transformers would read it as a malformed Hub id)."""
    if name_or_path is None:
        return
    text = os.fspath(name_or_path)
    looks_local = isinstance(name_or_path, os.PathLike) or os.path.isabs(text) or text.startswith((".", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(text)):
        raise ValueError(f"{argument}: the folder {text!r} does not exist")


def check_clip_vision_tower(vision_type: str, vision_model_name_or_path):
    if vision_type not in ("clip", "clip_vision_model"):
        raise ValueError(
            f"{str(vision_model_name_or_path)!r} holds a {vision_type} model, not a CLIP vision tower: "
            "Flaminko's vision tower is a CLIPVisionModel"
        )


def take_cache(cache, kwargs: dict):
    """The cache, passed as `cache` or under its name before transformers 5.24, `past_key_values`
    (deprecated from 5.24 on, as in transformers' own models)."""
    old = kwargs.pop("past_key_values", None)
    if old is None:
        return cache
    check_not_both("cache", cache, "past_key_values", old)
    if CACHE_NAME != "past_key_values" and not torch.compiler.is_compiling():
        warnings.warn("`past_key_values` is deprecated since transformers 5.24: pass the cache as `cache`", FutureWarning)
    return old


def checked_pixel_values(pixel_values, vision_config) -> torch.Tensor:
    """pixel_values as (B, T_img, F, C, H, W), or a ValueError/TypeError saying what was expected."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a float tensor, got {pixel_values.dtype}: pass the images through the "
            "processor, which rescales and normalises them"
        )
    if pixel_values.ndim == 5:
        pixel_values = pixel_values.unsqueeze(2)
    if pixel_values.ndim != 6:
        raise ValueError(
            "pixel_values must have shape (batch, images, channels, height, width) or "
            f"(batch, images, frames, channels, height, width); got {tuple(pixel_values.shape)}"
        )
    batch, num_images, num_frames, channels, height, width = pixel_values.shape
    expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
    if (channels, height, width) != expected:
        raise ValueError(
            f"pixel_values images are {channels}x{height}x{width} but the vision tower expects "
            f"{expected[0]}x{expected[1]}x{expected[2]} (channels x height x width)"
        )
    if 0 in (batch, num_images, num_frames):
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} hold no image: give at least one image (and "
            "frame) per sample, or leave pixel_values out for text-only input"
        )
    # The images are encoded once, on the prompt: this check never runs in a decoding step.
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values contain NaN or infinite values: check the image decoding and normalisation")
    return pixel_values


def check_frame_count(num_frames: int, max_num_frames: int):
    if num_frames > max_num_frames:
        raise ValueError(
            f"Media have {num_frames} frames but the model has frame embeddings for at most "
            f"{max_num_frames} (config.max_num_frames)"
        )


def _embedding_size(embeddings: nn.Module) -> tuple[int, int]:
    """(rows, width) of the LM's input embeddings, read from the module, never from its weight: under
    DeepSpeed ZeRO-3 the weight is partitioned (its shape reads (0,) outside the module's forward), and a
    PEFT token wrapper computes its weight at each read (it keeps the embedding as original_module)."""
    embedding = getattr(embeddings, "original_module", embeddings)
    return embedding.num_embeddings, embedding.embedding_dim


def check_text_inputs(input_ids, attention_mask, labels, prompt: bool, inputs_embeds, embeddings: nn.Module):
    """Types and shapes of the text inputs and, on the prompt (nothing cached yet), the token ids
    against the vocabulary: the rows of `embeddings`, the LM's input embeddings."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("Pass input_ids or inputs_embeds: the <image> tokens in them place the images")
    vocab, width = _embedding_size(embeddings)
    if inputs_embeds is not None:
        _check_inputs_embeds(inputs_embeds, attention_mask, labels, width)
        if input_ids is None:
            return
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}"
            + (": for one sample use input_ids[None]" if input_ids.ndim == 1 else "")
        )
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no sample (batch size 0): there is nothing to run")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: there is no text to run")
    if inputs_embeds is not None and input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)} but inputs_embeds has {tuple(inputs_embeds.shape[:2])} "
            "tokens: given together, they are one prompt (the embeddings feed the LM, the ids place the images)"
        )
    if isinstance(attention_mask, dict):
        # generate's per-layer-type masks (full / sliding attention) for a static cache: built by transformers.
        attention_mask = next((mask for mask in attention_mask.values() if mask is not None), None)
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if attention_mask is not None:
        if attention_mask.ndim not in (2, 4) or attention_mask.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"attention_mask must have shape (batch, sequence) = {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if prompt and attention_mask.ndim == 2 and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}: they must match, one mask entry per token"
            )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but input_ids have {tuple(input_ids.shape)}")
    if _reads_values(prompt):
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary 0..{vocab - 1}: "
                "use the processor's tokenizer, whose special tokens the model's embeddings were resized for"
            )


def _check_inputs_embeds(inputs_embeds, attention_mask, labels, width: int):
    if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be a float torch.Tensor, got {_describe_tensor(inputs_embeds)}")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != width or 0 in inputs_embeds.shape[:2]:
        raise ValueError(
            f"inputs_embeds must have shape (batch, sequence, {width}) with at least one token, "
            f"got {tuple(inputs_embeds.shape)}"
        )
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if isinstance(tensor, torch.Tensor) and tensor.ndim == 2 and tensor.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but inputs_embeds has {tuple(inputs_embeds.shape[:2])} tokens"
            )


def check_image_batch(pixel_values, image_features, batch: int, media_expansion: int):
    """The images encoded from pixel_values, one row of them per prompt of `batch` rows."""
    if image_features.shape[0] * media_expansion != batch:
        raise ValueError(
            f"pixel_values has batch size {pixel_values.shape[0]} but input_ids has {batch}"
            + (f" (with {media_expansion} sequences per prompt)" if media_expansion > 1 else "")
        )


def checked_image_features(image_features, config, batch: int, media_expansion: int, prompt: bool) -> torch.Tensor:
    if not isinstance(image_features, torch.Tensor):
        raise TypeError(f"image_features must be a torch.Tensor, got {type(image_features).__name__}")
    dim = config.vision_config.hidden_size
    latents = config.perceiver_num_latents
    if (
        image_features.ndim != 3
        or image_features.shape[0] * media_expansion != batch
        or image_features.shape[1] == 0
        or image_features.shape[1] % latents
        or image_features.shape[-1] != dim
    ):
        raise ValueError(
            f"image_features must be (batch={batch // media_expansion}, images * {latents} latents, {dim}) "
            f"as get_image_features' pooler_output gives them; got {tuple(image_features.shape)}"
        )
    if _reads_values(prompt) and not bool(torch.isfinite(image_features).all()):
        raise ValueError("image_features contain NaN or infinite values")
    return image_features


def check_context(past_length, length: int, text_config):
    """The cached tokens and the call's `length` new ones fit in the LM's context. A static cache counts
    its tokens as a tensor, not read here: its size bounds the context itself."""
    context = language_model_context(text_config)
    if context is not None and isinstance(past_length, int) and past_length + length > context:
        raise ValueError(
            f"{past_length + length} tokens exceed the language model's context of {context}: "
            "shorten the text (the processor's truncation keeps every image with its <image> or says why not)"
        )


def check_image_embedding_is_unique(weight: torch.Tensor, media_token_id: int):
    """inputs_embeds without input_ids place the images where the <image> row of `weight` (the LM's input
    embeddings) stands, so no other row may equal it."""
    if not torch.compiler.is_compiling() and int((weight == weight[media_token_id]).all(-1).sum()) > 1:
        # from_backbones starts every new token's row at the same mean, until training sets them apart.
        raise ValueError(
            "inputs_embeds cannot show where the images go: another token has the embedding of <image> "
            "(new token rows are equal until trained); pass input_ids"
        )


def check_media_inputs(image_tokens, image_features, past_image_token_count, prompt: bool):
    """Images and the <image> places that take them come together. image_tokens: (B, T) True at the
    <image> places, None when config.media_token_id is not set."""
    if image_features is None:
        if image_tokens is not None and _reads_values(prompt) and bool(image_tokens.any()):
            raise ValueError("input_ids contain <image> tokens but neither pixel_values nor image_features were given")
        return
    if image_tokens is None:
        raise ValueError("config.media_token_id is not set: the model cannot tell where the images go")
    if not prompt and past_image_token_count is None:
        raise ValueError(
            "Decoding from a cache with images needs past_image_token_count: pass the "
            "image_token_count of the previous call's output"
        )


def check_image_token_count(positions: torch.LongTensor, num_images: int, prompt: bool):
    """No <image> without its image. positions: image_token_positions of the call's tokens."""
    most = int(positions[:, -1].max()) if _reads_values(prompt) and positions.numel() else 0
    if most > num_images:
        raise ValueError(f"A sample has {most} <image> tokens but only {num_images} images were given per sample")


def check_media_key_values(media_key_values, num_blocks: int):
    if len(media_key_values) != num_blocks:
        raise ValueError(f"media_key_values has {len(media_key_values)} entries for {num_blocks} gated blocks")


def check_score_inputs(input_ids, labels, candidates_per_prompt: int):
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[0] % candidates_per_prompt:
        raise ValueError(f"{input_ids.shape[0]} rows do not split into groups of {candidates_per_prompt} candidates")
