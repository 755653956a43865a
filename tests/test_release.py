"""flaminko release: checks, fills in, cards that parse, remote code without the package, upload to a Hub on loopback."""

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from conftest import noise_image
from fake_hub import FakeHub
from flaminko.release import REMOTE_CODE, is_adapter, problems, release
from test_loading import REMOTE_SCRIPT, sample


def bare_folder(model, processor, folder):
    """A saved model stripped of what a release adds: remote code, auto_map, card."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in REMOTE_CODE:
        (folder / name).unlink()
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_release_fills_in_what_is_missing_and_the_card_parses(model_and_processor, tmp_path, capsys):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    found = problems(folder)
    assert any("remote code" in p for p in found) and any("auto_map" in p for p in found) and any("README" in p for p in found)
    files = release(folder, "flaminko/tiny-ko")
    assert problems(folder) == []
    printed = capsys.readouterr().out
    assert "would upload to flaminko/tiny-ko" in printed and "model.safetensors" in printed
    assert {"config.json", "model.safetensors", "modeling_flaminko.py", "README.md", "processor_config.json"} <= set(files)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["language"] == ["ko", "en"] and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text" and "flaminko" in data["tags"]
    assert "cross_attn_every_n_layers" in card.text and "trust_remote_code=True" in card.text
    assert "## Limitations" in card.text and "한국어" in card.text


def test_folder_that_cannot_be_completed_is_refused(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    (folder / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="processor: processor_config.json missing"):
        release(folder, "flaminko/tiny-ko")


def test_released_folder_loads_without_the_package_and_generates_the_same(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    release(folder, "flaminko/tiny-ko")
    paths = []
    for index in (1, 2):
        path = tmp_path / f"image{index}.png"
        noise_image(index).save(path)
        paths.append(str(path))
    (tmp_path / "load.py").write_text(REMOTE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(folder), *paths], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = json.loads(result.stdout.strip().splitlines()[-1].split(" ", 2)[2])
    assert tokens == model.generate(**sample(processor), max_new_tokens=6, do_sample=False)[0].tolist()


def test_push_uploads_every_file_to_the_hub(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_local_test", "HF_HUB_DISABLE_TELEMETRY": "1"}
        command = [sys.executable, "-m", "flaminko.cli", "release", str(folder), "--repo-id", "flaminko/tiny-ko", "--push", "--private"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos["flaminko/tiny-ko"]
    assert repo["private"]
    local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert repo["files"] == local
    assert "auto_map" in json.loads(repo["files"]["config.json"])
    assert hub.validated and hub.validated[-1]["pipeline_tag"] == "image-text-to-text"


def test_peft_adapter_releases_with_a_card_naming_its_base(model_and_processor, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = model_and_processor
    base = tmp_path / "base"
    model.save_pretrained(base)
    model.name_or_path = str(base)
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=r"language_model\.gpt_neox\.layers\.\d+\.attention\.query_key_value"))
    adapter.save_pretrained(tmp_path / "adapter")
    assert is_adapter(tmp_path / "adapter")
    release(tmp_path / "adapter", "flaminko/tiny-ko-lora")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == str(base) and card.data.library_name == "peft"
    assert problems(tmp_path / "adapter") == []


def test_conversion_and_training_folders_pass_the_check(backbones, tmp_path):
    from test_training import caption_table, run  # noqa: F401

    assert problems(tmp_path / "nothing-here") != []
    table = tmp_path / "t.tsv"
    noise_image(0).save(tmp_path / "0.png")
    table.write_text("image\tcaption\n0.png\t빨간색 원\n0.png\t파란색 네모\n", encoding="utf-8")
    _, final = run(backbones, table, tmp_path / "run", steps=2, eval_on_start=False, eval_strategy="no")
    assert problems(final) == []
    assert "flaminko train" in ModelCard.load(final / "README.md").text
