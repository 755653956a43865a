"""OpenFlamingo's entry point, so OpenFlamingo / OpenFlaminKO code runs with only its import changed.

`model.generate(vision_x=..., lang_x=..., attention_mask=...)` is handled by the model itself.
"""

from .modeling_flaminko import FlaminkoForConditionalGeneration
from .processing_flaminko import load_image

# open_clip (architecture, pretrained tag) -> the same weights on the Hugging Face Hub.
OPEN_CLIP_TO_HF = {
    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
    ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
}


class OpenFlamingoImageTransform:
    """Called like open_clip's preprocess: one image -> a (C, H, W) tensor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(images=load_image(image), return_tensors="pt")["pixel_values"][0]


def create_model_and_transforms(
    clip_vision_encoder_path: str,
    clip_vision_encoder_pretrained: str | None,
    lang_encoder_path: str,
    tokenizer_path: str | None = None,
    cross_attn_every_n_layers: int = 1,
    **flaminko_kwargs,
):
    """OpenFlamingo's factory: returns (model, image_processor, tokenizer).

    clip_vision_encoder_path is an open_clip name (with its pretrained tag, e.g. "ViT-L-14" +
    "openai") or a Hugging Face CLIP id/folder.
    """
    vision = OPEN_CLIP_TO_HF.get((clip_vision_encoder_path, clip_vision_encoder_pretrained), clip_vision_encoder_path)
    model, processor = FlaminkoForConditionalGeneration.from_backbones(
        vision,
        lang_encoder_path,
        tokenizer_name_or_path=tokenizer_path,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        **flaminko_kwargs,
    )
    return model, OpenFlamingoImageTransform(processor.image_processor), processor.tokenizer
