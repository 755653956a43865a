"""FlaminkoProcessor: the CLIP image processor and the LM's tokenizer behind one call.

Text carries one `<image>` placeholder per image; `<|endofchunk|>` closes the text of an image.
Shipped to the Hub as remote code: imports only torch, transformers and sibling files.
"""

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"

# A conversation of image-text turns; images go where their {"type": "image"} parts stand and every
# assistant turn is closed by <|endofchunk|>, the token that ends generation.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- else -%}"
    "{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}<|endofchunk|>{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def load_image(image) -> Image.Image:
    """An RGB, upright PIL image from a PIL image or a file path; a clear error for anything
    unreadable or too large to decode safely (PIL's decompression-bomb limit)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(image) as opened:
                    opened.load()
                    image = opened.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"Refusing image file {os.fspath(image)!r}: {error}") from error
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise ValueError(f"Cannot read image file {os.fspath(image)!r}: {error}") from error
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image))
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


class FlaminkoProcessor(ProcessorMixin):
    r"""Builds Flaminko inputs: `input_ids`, `attention_mask` and `pixel_values` (B, T_img, C, H, W).

    Args:
        image_processor: a CLIP image processor.
        tokenizer: the language model's tokenizer; `<|endofchunk|>` and `<image>` are added as special
            tokens (in that order, as OpenFlamingo does) and `<PAD>` when it has no pad token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = IMAGE_TOKEN,
        end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
        image_token_id: int | None = None,
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
        self.image_token = image_token
        self.end_of_chunk_token = end_of_chunk_token
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_token_id = image_token_id
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _images_per_sample(self, texts: list[str], images) -> list[list]:
        counts = [text.count(self.image_token) for text in texts]
        if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
            per_sample = [[] for _ in texts]
        elif _is_image(images):
            per_sample = [[images]] if len(texts) == 1 else None
        elif all(isinstance(item, (list, tuple)) for item in images):
            per_sample = [list(item) for item in images]
        elif len(texts) == 1:
            per_sample = [list(images)]
        elif len(images) == sum(counts):
            # A flat list across the batch: images go to the texts in order of their <image> tokens.
            flat = iter(images)
            per_sample = [[next(flat) for _ in range(count)] for count in counts]
        else:
            per_sample = None
        if per_sample is None or len(per_sample) != len(texts):
            raise ValueError(
                f"Could not match the images to {len(texts)} texts: pass one list of images per text "
                f"(the texts hold {counts} <image> tokens)"
            )
        for index, (count, sample_images) in enumerate(zip(counts, per_sample)):
            if count != len(sample_images):
                raise ValueError(
                    f"Text {index} has {count} {self.image_token} tokens but {len(sample_images)} images were given"
                )
        return per_sample

    def __call__(
        self, images=None, text=None, return_tensors="pt", padding=True, drop_truncated_images=False, **kwargs
    ) -> BatchFeature:
        """text: a string or a list of strings with `<image>` placeholders; images: for one text, an
        image or a list of images; for a batch, a list of image lists (one per text, any length,
        including none). Images may be PIL images, arrays, tensors or file paths.

        If truncation cuts `<image>` tokens off, that is an error, or with drop_truncated_images
        (for training) the images that lost their place are left out."""
        if text is None:
            raise ValueError("FlaminkoProcessor needs text (with an <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        empty = [index for index, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"Texts {empty} are empty: each text needs at least its <image> placeholders or a word")
        per_sample = self._images_per_sample(texts, images)
        encoding = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs)
        for index, sample_images in enumerate(per_sample):
            kept = int((torch.as_tensor(encoding["input_ids"][index]) == self.image_token_id).sum())
            if kept > len(sample_images):
                marker = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
                raise ValueError(
                    f"Text {index} marks {kept} images but has {len(sample_images)}: the image-marking token "
                    f"{marker!r} also stands outside the {self.image_token} placeholders"
                )
            if kept < len(sample_images) and drop_truncated_images:
                per_sample[index] = sample_images[:kept]
            elif kept < len(sample_images):
                raise ValueError(
                    f"Text {index} keeps {kept} of its {len(sample_images)} {self.image_token} tokens after "
                    "truncation: raise max_length or shorten the text, so that no image loses its place"
                )
        data = dict(encoding)
        most_images = max(len(sample_images) for sample_images in per_sample)
        if most_images:
            flat = [load_image(image) for sample_images in per_sample for image in sample_images]
            pixels = self.image_processor(images=flat, return_tensors="pt")["pixel_values"]
            pixel_values = pixels.new_zeros(len(texts), most_images, *pixels.shape[1:])
            start = 0
            for index, sample_images in enumerate(per_sample):
                pixel_values[index, : len(sample_images)] = pixels[start : start + len(sample_images)]
                start += len(sample_images)
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, skip_special_tokens: bool = True, **kwargs):
        return self.tokenizer.batch_decode(*args, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, *args, skip_special_tokens: bool = True, **kwargs):
        return self.tokenizer.decode(*args, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["FlaminkoProcessor"]
