"""FlaminkoProcessor: the CLIP image processor and the LM's tokenizer behind one call.

Text carries one `<image>` placeholder per image and one `<video>` placeholder per video (each
video becomes one `<image>` token, its frames one media item); `<|endofchunk|>` closes the text of
an image.
Shipped to the Hub as remote code: imports only torch, transformers and sibling files.
"""

import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs, Unpack

from .configuration_flaminko import check_positive_ints

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
VIDEO_TOKEN = "<video>"
# Frames kept per video: longer videos are sampled evenly down to this many.
DEFAULT_MAX_NUM_FRAMES = 8

# A conversation of image-text turns; images go where their {"type": "image"} parts stand and every
# assistant turn is closed by <|endofchunk|>, the token that ends generation.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>{%- elif part['type'] == 'video' -%}<video>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}<|endofchunk|>{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def decode_image_file(source) -> Image.Image:
    """The fully decoded PIL image of a path or a binary file object. An image over PIL's
    decompression-bomb limit raises (Image.DecompressionBombError or DecompressionBombWarning)
    before it is decoded, instead of only warning; an unreadable one raises PIL's own error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as opened:
            opened.load()
            return opened.copy()


def load_image(image) -> Image.Image:
    """An RGB, upright PIL image from a PIL image or a file path (arrays and tensors are checked
    and passed on); a clear error for anything unreadable, empty, non-finite or too large to decode
    safely (PIL's decompression-bomb limit)."""
    if isinstance(image, (bytes, bytearray)):
        raise TypeError("An image was given as raw bytes: open them first, e.g. PIL.Image.open(io.BytesIO(data))")
    if not _is_image(image):
        raise TypeError(
            f"An image must be a PIL image, a numpy array, a torch tensor or a file path; got {type(image).__name__}"
        )
    if isinstance(image, (str, os.PathLike)):
        try:
            image = decode_image_file(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"Refusing image file {os.fspath(image)!r}: {error}") from error
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise ValueError(f"Cannot read image file {os.fspath(image)!r}: {error}") from error
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"An image is {image.width}x{image.height} pixels: it has nothing to see")
        return _to_rgb(ImageOps.exif_transpose(image))
    return _checked_array(image)


def _checked_array(image):
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    shape = tuple(array.shape)
    channels_ok = array.ndim == 2 or (array.ndim == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4)))
    if not channels_ok or 0 in shape:
        raise ValueError(
            f"An image array has shape {shape}: expected (height, width), (height, width, channels) or "
            "(channels, height, width) with 1, 3 or 4 channels and no empty side"
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise TypeError(f"An image array has dtype {array.dtype}: expected integers or floats")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError("An image array contains NaN or infinite values")
    if array.ndim == 2:
        # A greyscale image, as a PIL "L" image is: the image processor reads (height, width, 1) as one,
        # but cannot tell a bare (height, width) from a list of rows.
        return image[..., None]
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        # 16-bit and float images would be clipped to white by a plain convert: rescale to 8 bits.
        pixels = np.asarray(image, dtype=np.float32)
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
        return Image.fromarray(pixels.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas go on white, not on whatever colour their hidden pixels hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _is_image(value) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike, torch.Tensor)) or hasattr(value, "__array__")


def _is_frame(value) -> bool:
    """A frame of a video given as a list: a one-frame PIL image, an array or a tensor (a path in a
    list of videos names a video file)."""
    if isinstance(value, Image.Image):
        return getattr(value, "n_frames", 1) == 1
    return not isinstance(value, (str, os.PathLike)) and _is_image(value) and not getattr(value, "ndim", 3) == 4


def _is_video(value) -> bool:
    """A video: a list of frames, a (frames, ...) array or tensor, a multi-frame image (GIF) or its path."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_is_frame(frame) for frame in value)
    if isinstance(value, Image.Image):
        return getattr(value, "n_frames", 1) > 1
    if isinstance(value, (str, os.PathLike)):
        return True
    return hasattr(value, "ndim") and value.ndim == 4


def video_frames(video) -> list:
    """The frames of a video, in order."""
    if isinstance(video, (str, os.PathLike)):
        try:
            with Image.open(video) as opened:
                return [frame.convert("RGB") for frame in ImageSequence.Iterator(opened)]
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise ValueError(
                f"Cannot read video file {os.fspath(video)!r} as an image sequence (GIF, animated PNG/WebP): {error}. "
                "Decode other formats to a list of frames or a (frames, height, width, channels) array first"
            ) from error
    if isinstance(video, Image.Image):
        return [frame.copy() for frame in ImageSequence.Iterator(video)]
    return list(video)


def frame_indices(length: int, count: int) -> list[int]:
    """count frame indices evenly spaced over a clip of length frames, first and last included
    (repeated when the clip is shorter)."""
    return np.linspace(0, length - 1, count).round().astype(int).tolist()


def _media_per_sample(media, counts: list[int], is_item, kind: str) -> list[list]:
    """For one text, one item or a list of items; for a batch, a list of item lists (one per text,
    any length) or a flat list spread over the texts in order of their placeholders."""
    if media is None or (isinstance(media, (list, tuple)) and len(media) == 0):
        return [[] for _ in counts]
    if isinstance(media, (bytes, bytearray)) or (
        isinstance(media, (list, tuple)) and any(isinstance(item, (bytes, bytearray)) for item in media)
    ):
        raise TypeError(f"{kind} were given as raw bytes: open them first, e.g. PIL.Image.open(io.BytesIO(data))")
    if is_item(media):
        per_sample = [[media]] if len(counts) == 1 else None
    elif not isinstance(media, (list, tuple)):
        raise TypeError(f"{kind} must be given as a list, got {type(media).__name__}")
    elif all(is_item(item) for item in media):
        if len(counts) == 1:
            per_sample = [list(media)]
        elif len(media) == sum(counts):
            flat = iter(media)
            per_sample = [[next(flat) for _ in range(count)] for count in counts]
        else:
            per_sample = None
    elif all(isinstance(item, (list, tuple)) and all(is_item(x) for x in item) for item in media):
        per_sample = [list(item) for item in media]
    else:
        bad = next(item for item in media if not is_item(item) and not isinstance(item, (list, tuple)))
        raise TypeError(
            f"{kind} hold a {type(bad).__name__}: expected PIL images, numpy arrays, torch tensors or file paths"
            + (" (frames of a video: a list of those, or a (frames, height, width, channels) array)" if kind == "videos" else "")
        )
    if per_sample is None or len(per_sample) != len(counts):
        raise ValueError(
            f"Could not match the {kind} to {len(counts)} texts: pass one list of {kind} per text "
            f"(the texts hold {counts} placeholders for them)"
        )
    return per_sample


CHAT_ROLES = ("system", "user", "assistant")
CHAT_PART_TYPES = ("text", "image", "video")


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"A conversation must be a non-empty list of messages, got {_describe(messages)}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES or "content" not in message:
            raise ValueError(
                f"Message {index} must be a dict with a role in {CHAT_ROLES} and a content, got {message!r}"
            )
        content = message["content"]
        if isinstance(content, str):
            continue
        parts = content if isinstance(content, (list, tuple)) else [content]
        for part in parts:
            if not isinstance(part, dict) or part.get("type") not in CHAT_PART_TYPES:
                raise ValueError(
                    f"Message {index} has a content part {part!r}: expected a string, or parts "
                    f"{{'type': one of {CHAT_PART_TYPES}, ...}}"
                )
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"Message {index} has a text part without a 'text' string: {part!r}")


def _given(media) -> bool:
    return media is not None and not (isinstance(media, (list, tuple)) and len(media) == 0)


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        inner = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {', '.join(inner)}" if inner else f"an empty {type(value).__name__}"
    return type(value).__name__


class FlaminkoProcessorKwargs(ProcessingKwargs, total=False):
    # Training: leave out the media whose <image> tokens truncation cut off, instead of refusing the text.
    drop_truncated_images: bool


class FlaminkoProcessor(ProcessorMixin):
    r"""Builds Flaminko inputs: `input_ids`, `attention_mask` and `pixel_values` (B, T_img, C, H, W).

    Args:
        image_processor: a CLIP image processor.
        tokenizer: the language model's tokenizer; `<|endofchunk|>` and `<image>` are added as special
            tokens (in that order, as OpenFlamingo does) and `<PAD>` when it has no pad token.
    """

    valid_processor_kwargs = FlaminkoProcessorKwargs
    # The defaults of a call, below the tokenizer's own settings and the call's arguments (see
    # ProcessorMixin._merge_kwargs): padded (to the left, as the tokenizer of from_backbones pads)
    # PyTorch tensors, every image kept.
    text_kwargs = {"padding": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}
    drop_truncated_images = False

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = IMAGE_TOKEN,
        end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
        image_token_id: int | None = None,
        video_token: str = VIDEO_TOKEN,
        max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
        **kwargs,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("FlaminkoProcessor needs both an image_processor and a tokenizer")
        # image_token_id given: the image placeholder stays plain text and the images are placed at
        # this token of its tokenization (flamingo-mini: the "<" of "<image>").
        added = [end_of_chunk_token] if image_token_id is not None else [end_of_chunk_token, image_token]
        missing = [t for t in added if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        check_positive_ints(max_num_frames=max_num_frames)
        self.image_token = image_token
        self.video_token = video_token
        self.max_num_frames = max_num_frames
        self.end_of_chunk_token = end_of_chunk_token
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_token_id = image_token_id
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        # The default template is not set as the processor's chat_template: pipelines take one as a
        # sign that plain prompts are second best, and plain `<image>` prompts are Flaminko's own form.
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _media_of_texts(self, texts: list[str], images, videos) -> list[list[tuple[str, object]]]:
        """Per text, its media in placeholder order, each as ("image", image) or ("video", video).

        Videos go where `<video>` stands; a prompt given only videos may mark them with `<image>`."""
        placeholders = re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")
        kinds = [["video" if p == self.video_token else "image" for p in placeholders.findall(t)] for t in texts]
        if _given(videos) and not any("video" in k for k in kinds):
            if _given(images):
                raise ValueError(
                    f"Both images and videos were given but no text has a {self.video_token} placeholder: "
                    f"mark each video with {self.video_token} and each image with {self.image_token}"
                )
            kinds = [["video"] * len(k) for k in kinds]
        counts = {kind: [k.count(kind) for k in kinds] for kind in ("image", "video")}
        given = {
            "image": _media_per_sample(images, counts["image"], _is_image, "images"),
            "video": _media_per_sample(videos, counts["video"], _is_video, "videos"),
        }
        for kind, placeholder in (("image", self.image_token), ("video", self.video_token)):
            for index, (count, items) in enumerate(zip(counts[kind], given[kind])):
                if count != len(items):
                    raise ValueError(f"Text {index} has {count} {placeholder} tokens but {len(items)} {kind}s were given")
        media = []
        for sample_kinds, sample_images, sample_videos in zip(kinds, given["image"], given["video"]):
            queues = {"image": iter(sample_images), "video": iter(sample_videos)}
            media.append([(kind, next(queues[kind])) for kind in sample_kinds])
        return media

    def __call__(
        self, images=None, text=None, videos=None, **kwargs: Unpack[FlaminkoProcessorKwargs]
    ) -> BatchFeature:
        """text: a string or a list of strings with an `<image>` placeholder per image and a `<video>`
        placeholder per video. images: for one text, an image or a list of images; for a batch, a list
        of image lists (one per text, any length, including none). Images may be PIL images, arrays,
        tensors or file paths. videos: likewise, each video a list of frames, a (frames, height, width,
        channels) array or tensor, or an animated image (GIF); a prompt with videos only may mark them
        with `<image>`.

        pixel_values are (B, media, C, H, W), or with any video (B, media, frames, C, H, W): each video
        sampled evenly to at most max_num_frames frames, all to the same count, and an image among
        videos repeated as a still clip of that many frames.

        Other keyword arguments go to the tokenizer or the image processor, as in transformers'
        processors (also grouped: text_kwargs={...}, images_kwargs={...}); the defaults pad and return
        PyTorch tensors. If truncation cuts `<image>` tokens off, that is an error, or with
        drop_truncated_images=True (for training) the media that lost their place are left out."""
        if text is None:
            raise ValueError("FlaminkoProcessor needs text (with an <image> placeholder per image)")
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise TypeError(f"text must be a string or a non-empty list of strings, got {_describe(text)}")
        empty = [index for index, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"Texts {empty} are empty: each text needs at least its <image> placeholders or a word")
        media = self._media_of_texts(texts, images, videos)
        texts = [t.replace(self.video_token, self.image_token) for t in texts]
        settings = self._merge_kwargs(FlaminkoProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = settings["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        encoding = self.tokenizer(texts, return_tensors=return_tensors, **text_kwargs)
        for index, sample_media in enumerate(media):
            kept = int((torch.as_tensor(encoding["input_ids"][index]) == self.image_token_id).sum())
            if kept > len(sample_media):
                marker = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
                raise ValueError(
                    f"Text {index} marks {kept} images but has {len(sample_media)}: the image-marking token "
                    f"{marker!r} also stands outside the {self.image_token} placeholders"
                )
            if kept < len(sample_media) and settings["drop_truncated_images"]:
                media[index] = sample_media[:kept]
            elif kept < len(sample_media):
                raise ValueError(
                    f"Text {index} keeps {kept} of its {len(sample_media)} {self.image_token} tokens after "
                    "truncation: raise max_length or shorten the text, so that no image loses its place"
                )
        data = dict(encoding)
        pixel_values = self._pixel_values(media, settings["images_kwargs"])
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _pixel_values(self, media: list[list[tuple[str, object]]], images_kwargs: dict) -> torch.Tensor | None:
        most_media = max(len(sample_media) for sample_media in media)
        if not most_media:
            return None
        entries = [entry for sample_media in media for entry in sample_media]
        clips = [[item] if kind == "image" else video_frames(item) for kind, item in entries]
        lengths = [len(frames) for (kind, _), frames in zip(entries, clips) if kind == "video"]
        if 0 in lengths:
            raise ValueError("A video has no frames")
        num_frames = min(self.max_num_frames, max(lengths)) if lengths else 1
        # Each sampled frame is loaded and processed once; an image among videos (a still clip) and a
        # short video repeat theirs by index.
        frames, picks = [], []
        for clip in clips:
            indices = frame_indices(len(clip), num_frames)
            position = {index: len(frames) + rank for rank, index in enumerate(dict.fromkeys(indices))}
            frames += [load_image(clip[index]) for index in position]
            picks += [position[index] for index in indices]
        # Tensors here, whatever the call returns: the media of a batch are assembled with torch.
        pixels = self.image_processor(images=frames, **{**images_kwargs, "return_tensors": "pt"})["pixel_values"]
        pixels = pixels[picks]
        pixels = pixels.view(-1, num_frames, *pixels.shape[1:])
        pixel_values = pixels.new_zeros(len(media), most_media, *pixels.shape[1:])
        start = 0
        for index, sample_media in enumerate(media):
            pixel_values[index, : len(sample_media)] = pixels[start : start + len(sample_media)]
            start += len(sample_media)
        return pixel_values if lengths else pixel_values[:, :, 0]

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """ProcessorMixin's, with Flaminko's conversation template unless the processor or the call has
        another; the messages are checked first (roles, content parts), so a malformed one is named.
        With tokenize=True and no return_tensors, input_ids hold each conversation's own tokens as a
        list, unpadded, as transformers' processors return them (pixel_values stay a tensor)."""
        conversations = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
        for messages in conversations:
            _check_messages(messages)
        chat_template = chat_template or self.chat_template or DEFAULT_CHAT_TEMPLATE
        if kwargs.get("tokenize") and kwargs.get("return_tensors", "auto") == "auto":
            # Tools pad such lists themselves (TRL's GRPO trainer): the call's own padded tensors would
            # hand them the padding of a shorter conversation as its tokens.
            kwargs["processor_kwargs"] = {"padding": False, "return_tensors": None, **(kwargs.get("processor_kwargs") or {})}
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        # A call's truncation stays set on the fast tokenizer's backend (the training collator truncates),
        # and saved it would come back as the tokenizer's max_length default, merged into every later call.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
        saved = super().save_pretrained(save_directory, **kwargs)
        # Saving with remote code leaves its auto_map on the processor; it belongs to the saved folder,
        # so that to_dict reads the same before and after a save and load.
        vars(self).pop("auto_map", None)
        return saved


__all__ = ["FlaminkoProcessor", "FlaminkoProcessorKwargs"]
