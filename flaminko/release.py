"""`flaminko release`: check a model or adapter folder, fill in what a Hub release needs, upload.

A model folder needs config.json with an auto_map, safetensors weights, the processor files, the
three remote-code files and a model card; a PEFT adapter folder needs adapter_config.json, its
safetensors weights and a card naming its base model.
"""

import json
import math
import shutil
from importlib import resources
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

REMOTE_CODE = ("configuration_flaminko.py", "modeling_flaminko.py", "processing_flaminko.py")
AUTO_MAP = {
    "AutoConfig": "configuration_flaminko.FlaminkoConfig",
    "AutoModel": "modeling_flaminko.FlaminkoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_flaminko.FlaminkoForConditionalGeneration",
    "AutoProcessor": "processing_flaminko.FlaminkoProcessor",
}
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json")

ADAPTER_CARD = """---
{{ card_data }}
---

# {{ title }}

**한국어** — `{{ base }}` 위에서 학습한 Flaminko LoRA 어댑터입니다 (peft).

**English** — A Flaminko LoRA adapter (peft) trained on top of `{{ base }}`.

```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{{ base }}", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "{{ repo_id }}")
processor = AutoProcessor.from_pretrained("{{ base }}", trust_remote_code=True)
```
"""


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def problems(folder) -> list[str]:
    """What the folder lacks for a release (empty: ready)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    found = []
    if is_adapter(folder):
        if not (folder / "adapter_model.safetensors").is_file():
            found.append("adapter weights: no adapter_model.safetensors")
        if not _card_names_base(folder):
            found.append("model card: no card naming the base model")
        return found
    if not (folder / "config.json").is_file():
        return ["config.json is missing: not a model folder"]
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "flaminko":
        found.append(f"config.json: model_type is {config.get('model_type')!r}, not 'flaminko'")
    if not list(folder.glob("*.safetensors")):
        found.append("weights: no .safetensors files")
    missing_code = [name for name in REMOTE_CODE if not (folder / name).is_file()]
    if missing_code:
        found.append(f"remote code: {', '.join(missing_code)} missing")
    if not _auto_map_complete(config):
        found.append("config.json: auto_map incomplete")
    missing_processor = [name for name in PROCESSOR_FILES if not (folder / name).is_file()]
    if missing_processor:
        found.append(f"processor: {', '.join(missing_processor)} missing")
    if not (folder / "README.md").is_file():
        found.append("model card: README.md missing")
    return found


def fill_in(folder, repo_id: str) -> list[str]:
    """Add what can be made from the folder itself; returns what was added. Processor files and
    weights cannot be invented: those problems remain."""
    folder = Path(folder)
    added = []
    if is_adapter(folder):
        # PEFT writes a generic card of its own; a release needs one that names the base model.
        if not _card_names_base(folder):
            adapter_card(folder, repo_id).save(folder / "README.md")
            added.append("README.md (adapter card)")
        return added
    if not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")):
        from .modeling_flaminko import FlaminkoForConditionalGeneration

        FlaminkoForConditionalGeneration.from_pretrained(folder).save_pretrained(folder)
        added.append("safetensors weights (from the .bin files)")
    for name in REMOTE_CODE:
        if not (folder / name).is_file():
            shutil.copyfile(resources.files("flaminko").joinpath(name), folder / name)
            added.append(name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if not _auto_map_complete(config):
        config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        added.append("auto_map in config.json")
    if not (folder / "README.md").is_file():
        model_card(folder, repo_id).save(folder / "README.md")
        added.append("README.md (model card)")
    return added


def _auto_map_complete(config: dict) -> bool:
    return all(config.get("auto_map", {}).get(key) == value for key, value in AUTO_MAP.items())


def _card_names_base(folder: Path) -> bool:
    if not (folder / "README.md").is_file():
        return False
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return bool(base) and ModelCard.load(folder / "README.md").data.base_model == base


def model_card(folder: Path, repo_id: str) -> ModelCard:
    from safetensors import safe_open

    from .configuration_flaminko import FlaminkoConfig
    from .hub_card import build_model_card, count_parameters

    config = FlaminkoConfig.from_pretrained(folder)
    sizes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                shape = weights.get_slice(name).get_shape()
                sizes[name] = math.prod(shape)
    total, trained = count_parameters(config, sizes)
    base_models = [config.vision_config._name_or_path, config.text_config._name_or_path]
    return build_model_card(
        config,
        total_parameters=total,
        trained_parameters=trained,
        repo_id=repo_id,
        base_models=[name for name in base_models if name] or None,
    )


def adapter_card(folder: Path, repo_id: str) -> ModelCard:
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or "base model"
    data = ModelCardData(
        language=["ko", "en"],
        library_name="peft",
        pipeline_tag="image-text-to-text",
        base_model=base,
        tags=["flaminko", "flamingo", "lora", "peft"],
    )
    return ModelCard.from_template(data, template_str=ADAPTER_CARD, title=repo_id.split("/")[-1], base=base, repo_id=repo_id)


def release(folder, repo_id: str, *, push: bool = False, private: bool = False, token=None) -> list[str]:
    """Check, fill in, and upload with --push (else only list). Returns the files of the release."""
    folder = Path(folder)
    for note in fill_in(folder, repo_id):
        print(f"added: {note}")
    remaining = problems(folder)
    if remaining:
        raise ValueError(f"{folder} is not ready for release: " + "; ".join(remaining))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    total = sum((folder / name).stat().st_size for name in files)
    print(f"{'uploading' if push else 'would upload'} to {repo_id} ({'private' if private else 'public'}): "
          f"{len(files)} files, {total:,} bytes")
    for name in files:
        print(f"  {name}  {(folder / name).stat().st_size:,}")
    if push:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Release with flaminko")
    return files
