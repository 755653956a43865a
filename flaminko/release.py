"""`flaminko release`: check a model or adapter folder, fill in what a Hub release needs, upload.

A model folder needs config.json with an auto_map, safetensors weights, the processor files, the
remote-code files and a model card; a PEFT adapter folder needs adapter_config.json, its
safetensors weights and a card naming its base model on the Hub.

Everything that cannot be filled in is checked before anything is written: a folder that is not a
model folder, a bad repo id or an adapter without a Hub base model leaves the folder untouched.
Cards name the repo id (title, usage) and only Hub ids as base_model: the Hub rejects paths.
"""

import json
import math
import shutil
from importlib import resources
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from . import register_auto_classes
from .hub import is_hub_id
from .hub_card import DEFAULT_LICENSE

REMOTE_CODE = (
    "configuration_flaminko.py",
    "modeling_flaminko.py",
    "processing_flaminko.py",
    "checkpoint_mapping_flaminko.py",
    "input_checks_flaminko.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_flaminko.FlaminkoConfig",
    "AutoModel": "modeling_flaminko.FlaminkoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_flaminko.FlaminkoForConditionalGeneration",
    "AutoProcessor": "processing_flaminko.FlaminkoProcessor",
}
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json")
# Sections of a card written by `flaminko train` (or another Flaminko tool) that a release keeps.
KEPT_SECTIONS = ("## Training", "## Evaluation")

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


def check_repo_id(repo_id: str) -> str:
    """huggingface_hub's own validator, with the message of the command line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--repo-id {repo_id!r} is not a Hub repo id (ORG/NAME): {error}") from error
    return repo_id


def check_folder(folder: Path):
    """A model or adapter folder, or a ValueError naming what it is instead (and the model folder
    inside it, when there is one). Nothing is written."""
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; give the model folder (e.g. runs/ko/final)")
    if is_adapter(folder) or (folder / "config.json").is_file():
        return
    inside = sorted(p.parent for p in folder.glob("*/config.json")) + sorted(p.parent for p in folder.glob("*/adapter_config.json"))
    hint = f"; did you mean {inside[-1] if (folder / 'final') not in inside else folder / 'final'}?" if inside else ""
    raise ValueError(f"{folder} is not a model folder (no config.json or adapter_config.json); nothing was changed{hint}")


def _config_base_models(folder: Path) -> list[str]:
    config = json.loads((folder / "config.json").read_text())
    names = [config.get(key, {}).get("_name_or_path") for key in ("vision_config", "text_config")]
    return [name for name in names if name]


def resolve_base_models(folder: Path, given: list[str] | None) -> tuple[list[str], list[str]]:
    """(Hub ids for the card's base_model, local paths left out). Given ids must be Hub ids; an
    adapter needs exactly one, given or recorded in adapter_config.json."""
    for name in given or []:
        if not is_hub_id(name):
            raise ValueError(f"--base-model {name!r} is not a Hub repo id (ORG/NAME)")
    if is_adapter(folder):
        recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if given:
            if len(given) != 1:
                raise ValueError(f"An adapter has one base model; got --base-model {', '.join(given)}")
            return given, []
        if recorded and is_hub_id(recorded):
            return [recorded], []
        raise ValueError(
            f"The adapter's base model is {recorded or 'not recorded'}, not a Hub model, so the released adapter "
            "could not be loaded: release the base model first, then give --base-model ORG/NAME"
        )
    if given:
        return given, []
    names = _config_base_models(folder)
    return [name for name in names if is_hub_id(name)], [name for name in names if not is_hub_id(name)]


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
        return found + _card_metadata_problems(folder)
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
    return found + _card_metadata_problems(folder)


def _blockers(folder: Path) -> list[str]:
    """The problems a release cannot fix by filling in; checked before anything is written."""
    if is_adapter(folder):
        return [p for p in problems(folder) if p.startswith("adapter weights")]
    config = json.loads((folder / "config.json").read_text())
    found = [p for p in problems(folder) if p.startswith(("config.json: model_type", "processor"))]
    if not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin")):
        found.append("weights: no .safetensors or .bin files")
    if config.get("model_type") == "flaminko" and (folder / "README.md").is_file() and not _is_flaminko_card(folder):
        found += _card_metadata_problems(folder)
    return found


def _card_metadata_problems(folder: Path) -> list[str]:
    """What the Hub would reject in the card's metadata: base_model entries that are not Hub ids."""
    if not (folder / "README.md").is_file():
        return []
    base = ModelCard.load(folder / "README.md").data.base_model
    local = [name for name in ([base] if isinstance(base, str) else base or []) if not is_hub_id(name)]
    if not local:
        return []
    return [f"model card: base_model holds local paths the Hub rejects ({', '.join(local)}): put Hub ids there, or remove README.md to have one written"]


def _is_flaminko_card(folder: Path) -> bool:
    """A card written by Flaminko (train, convert, an earlier release) or PEFT's generic one: rewritten
    on release. A card of the user's own is kept as it is."""
    card = ModelCard.load(folder / "README.md")
    return "flaminko" in (card.data.tags or []) or "# Model Card for Model ID" in card.text


def _kept_sections(folder: Path) -> str:
    """The Training and Evaluation sections of the folder's card, to carry over to the rewritten one."""
    if not (folder / "README.md").is_file():
        return ""
    text = ModelCard.load(folder / "README.md").text
    starts = [text.find(f"\n{heading}\n") for heading in KEPT_SECTIONS if f"\n{heading}\n" in text]
    if not starts:
        return ""
    end = text.find("\n## Limitations", min(starts))
    return text[min(starts) : end if end > 0 else len(text)].rstrip() + "\n"


def fill_in(folder, repo_id: str, *, base_models: list[str] | None = None, license: str | None = None) -> list[str]:
    """Add what can be made from the folder itself; returns what was added or updated ("added: ...",
    "updated: ..."), nothing when the folder was ready. Processor files and weights cannot be
    invented: those problems remain."""
    folder = Path(folder)
    added = []
    rewrite_card = not (folder / "README.md").is_file() or _is_flaminko_card(folder)
    if is_adapter(folder):
        (base,) = base_models
        config_path = folder / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        if adapter_config.get("base_model_name_or_path") != base:
            adapter_config["base_model_name_or_path"] = base
            config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")
            added.append(f"added: base_model_name_or_path {base} in adapter_config.json")
        if rewrite_card:
            added += _save_card(adapter_card(folder, repo_id, license=license), folder, "adapter card")
        return added
    if not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")):
        from .modeling_flaminko import FlaminkoForConditionalGeneration

        register_auto_classes()
        FlaminkoForConditionalGeneration.from_pretrained(folder).save_pretrained(folder)
        added.append("added: safetensors weights (from the .bin files)")
    for name in REMOTE_CODE:
        if not (folder / name).is_file():
            shutil.copyfile(resources.files("flaminko").joinpath(name), folder / name)
            added.append(f"added: {name}")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if not _auto_map_complete(config):
        config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        added.append("added: auto_map in config.json")
    if rewrite_card:
        card = model_card(folder, repo_id, base_models=base_models, license=license)
        added += _save_card(card, folder, f"model card for {repo_id}")
    return added


def _save_card(card: ModelCard, folder: Path, kind: str) -> list[str]:
    """Writes the card unless the folder holds this very card already (a second release of a ready
    folder changes nothing, and says nothing)."""
    path = folder / "README.md"
    existed = path.is_file()
    if existed and path.read_bytes().decode("utf-8") == str(card):
        return []
    card.save(path)
    return [f"{'updated' if existed else 'added'}: README.md ({kind})"]


def _auto_map_complete(config: dict) -> bool:
    return all(config.get("auto_map", {}).get(key) == value for key, value in AUTO_MAP.items())


def _card_names_base(folder: Path) -> bool:
    if not (folder / "README.md").is_file():
        return False
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return bool(base) and ModelCard.load(folder / "README.md").data.base_model == base


def _card_license(folder: Path) -> str | None:
    return ModelCard.load(folder / "README.md").data.license if (folder / "README.md").is_file() else None


def model_card(folder: Path, repo_id: str, *, base_models: list[str] | None = None, license: str | None = None) -> ModelCard:
    """The card of a model folder for `repo_id`; the Training and Evaluation sections of its present
    card are kept."""
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
    return build_model_card(
        config,
        total_parameters=total,
        trained_parameters=trained,
        repo_id=repo_id,
        base_models=_config_base_models(folder) if base_models is None else base_models,
        kept_sections=_kept_sections(folder),
        license=license or _card_license(folder),
    )


def adapter_card(folder: Path, repo_id: str, *, license: str | None = None) -> ModelCard:
    """The card of a PEFT adapter folder, naming the base model of its adapter_config.json (a Hub id
    once released; a local folder in a card that `flaminko train` writes, with no base_model metadata)."""
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or "base model"
    data = ModelCardData(
        language=["ko", "en"],
        license=license or _card_license(folder) or DEFAULT_LICENSE,
        library_name="peft",
        pipeline_tag="image-text-to-text",
        base_model=base if is_hub_id(base) else None,
        tags=["flaminko", "flamingo", "lora", "peft"],
    )
    title = repo_id.rstrip("/").split("/")[-1]
    return ModelCard.from_template(data, template_str=ADAPTER_CARD, title=title, base=base, repo_id=repo_id)


def release(
    folder,
    repo_id: str,
    *,
    push: bool = False,
    private: bool = False,
    base_models: list[str] | None = None,
    license: str | None = None,
    token=None,
) -> list[str]:
    """Check, fill in, and upload with --push (else a dry run that lists the files). Returns the files
    of the release. Nothing is written when the folder cannot be made ready."""
    folder = Path(folder)
    check_repo_id(repo_id)
    check_folder(folder)
    bases, left_out = resolve_base_models(folder, base_models)
    blockers = _blockers(folder)
    if blockers:
        raise ValueError(f"{folder} cannot be released (nothing was changed): " + "; ".join(blockers))
    for name in left_out:
        print(f"base_model: left out {name} (a local path; the Hub accepts only Hub ids: give --base-model ORG/NAME)")
    for note in fill_in(folder, repo_id, base_models=bases, license=license):
        print(note)
    remaining = problems(folder)
    if remaining:
        raise ValueError(f"{folder} is not ready for release: " + "; ".join(remaining))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    total = sum((folder / name).stat().st_size for name in files)
    for name in files:
        print(f"  {name}  {(folder / name).stat().st_size:,}")
    summary = f"{len(files)} files, {total / 1e6:.1f} MB"
    if not push:
        print(f"ready to push: {summary} to {repo_id} ({'private' if private else 'public'}); add --push to upload")
        return files
    api = HfApi(token=token)
    ModelCard.load(folder / "README.md").validate()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Release with flaminko")
    print(f"pushed: {summary} to {api.endpoint}/{repo_id}")
    return files
