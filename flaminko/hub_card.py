"""Model cards for Flaminko folders, built from the config with huggingface_hub's ModelCard."""

from huggingface_hub import ModelCard, ModelCardData

from .configuration_flaminko import TRANSFORMERS_WINDOW

DEFAULT_LICENSE = "apache-2.0"
# The usage snippet's model before a release names the repo id.
LOCAL_FOLDER = "path/to/this/folder"
# What loading a released folder needs: its code ships with it (remote code), so no package is installed;
# that code runs on the transformers releases of the window, and says so on any other.
REQUIREMENTS = f"transformers{TRANSFORMERS_WINDOW}, torch, pillow"

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

**한국어** — Flaminko 모델입니다: 고정된 CLIP 비전 인코더와 Perceiver resampler, 그리고 언어 모델
앞에 놓인 gated cross-attention 블록(Flamingo 구조). 텍스트의 `<image>` 자리에 이미지가 들어가고,
`<|endofchunk|>`가 한 이미지의 글을 닫습니다.

**English** — A Flaminko model: a frozen CLIP vision tower, a Perceiver resampler and gated
cross-attention blocks in front of a causal language model (the Flamingo architecture). Images go
where the text holds `<image>`; `<|endofchunk|>` closes the text of an image.

{{ origin }}

## Architecture

| | |
|---|---|
| vision tower | {{ vision }} |
| language model | {{ language }} |
| cross_attn_every_n_layers | {{ every_n }} |
| gated cross-attention blocks | {{ num_blocks }} (before decoder layers {{ block_layers }}) |
| resampler | {{ latents }} latents, depth {{ depth }} |
| parameters | {{ total }} total, {{ trainable }} trainable |

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{{ repo_id }}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)
batch = processor(text="<image>Output:", images=[image])
print(processor.batch_decode(model.generate(**batch, max_new_tokens=20, num_beams=3), skip_special_tokens=True))
```

Nothing to install beyond `pip install "{{ requirements }}"`: the model's code (`configuration_flaminko.py`,
`modeling_flaminko.py`, `processing_flaminko.py`, `checkpoint_mapping_flaminko.py`, `input_checks_flaminko.py`)
comes with it and `trust_remote_code=True` runs it. That code is tested on transformers `{{ window }}` and, on any
other release, stops at loading with one line naming this window. With the Flaminko package installed from its source repository,
`import flaminko` registers the same classes and `trust_remote_code` is not needed.
{% if training %}
## Training

{{ training }}
{% endif %}{% if evaluation %}
## Evaluation

| task | metric | value |
|---|---|---|
{% for row in evaluation %}| {{ row.task }} | {{ row.metric }} | {{ row.value }} |
{% endfor %}{% endif %}{{ kept_sections }}
## Limitations

The model describes what its training data taught it; it can be wrong or biased, and it has not
been evaluated for safety-critical use. Only the resampler, the cross-attention blocks and the
embeddings of the new tokens were trained; the backbones are as their authors released them.
"""


def count_parameters(config, sizes: dict[str, int]) -> tuple[int, int]:
    """(total, trained) from {parameter name: number of elements}: the resampler and gated blocks,
    the backbones the config leaves unfrozen, and with a frozen LM only the two new-token rows of
    its embedding matrix."""
    prefixes = ["perceiver.", "cross_attn_layers."]
    if not config.freeze_vision_model:
        prefixes.append("vision_model.")
    if not config.freeze_language_model:
        prefixes.append("language_model.")
    trained = sum(size for name, size in sizes.items() if name.startswith(tuple(prefixes)))
    if config.freeze_language_model and config.train_new_token_embeddings:
        trained += 2 * config.text_config.hidden_size
    return sum(sizes.values()), trained


def parameter_counts(model) -> tuple[int, int]:
    """(total, trained) parameters of a model in memory; a parameter partitioned by DeepSpeed ZeRO-3
    counts whole (`ds_numel`), not the slice this process holds."""
    sizes = {name: getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters()}
    return count_parameters(model.config, sizes)


def build_model_card(
    config,
    *,
    total_parameters: int,
    trained_parameters: int,
    repo_id: str | None = None,
    title: str | None = None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    origin: str = "",
    training: str = "",
    evaluation: list[dict] | None = None,
    kept_sections: str = "",
    license: str | None = None,
) -> ModelCard:
    """A card for a Flaminko model with this config, loaded as `repo_id` (a Hub id, or the local
    folder before a release; `flaminko release` fills in the repo id) in its usage snippet; titled
    with the repo's name unless `title` is given. Of base_models only Hub ids are kept: the Hub
    rejects paths. Evaluation rows are dicts with task, metric, value; kept_sections is markdown
    carried over from an earlier card."""
    from .hub import is_hub_id

    repo_id = repo_id or LOCAL_FOLDER
    base_models = [name for name in base_models or [] if is_hub_id(name)]
    layers = config.cross_attn_layer_indices
    card_data = ModelCardData(
        language=["ko", "en"],
        license=license or DEFAULT_LICENSE,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_models or None,
        datasets=datasets or None,
        tags=["flaminko", "flamingo", "image-text-to-text", "custom_code"],
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=title or ("Flaminko model" if repo_id == LOCAL_FOLDER else repo_id.rstrip("/").split("/")[-1]),
        origin=origin,
        vision=f"CLIP ViT, width {config.vision_config.hidden_size}, {config.vision_config.num_hidden_layers} layers",
        language=f"{config.text_config.model_type}, width {config.text_config.hidden_size}, "
        f"{config.text_config.num_hidden_layers} layers",
        every_n=config.cross_attn_every_n_layers if config.cross_attn_layers is None else "explicit",
        num_blocks=len(layers),
        block_layers=", ".join(map(str, layers)),
        latents=config.perceiver_num_latents,
        depth=config.perceiver_depth,
        total=f"{total_parameters:,}",
        trainable=f"{trained_parameters:,}",
        repo_id=repo_id,
        training=training,
        evaluation=evaluation or [],
        kept_sections=kept_sections,
        requirements=REQUIREMENTS,
        window=TRANSFORMERS_WINDOW,
    )
