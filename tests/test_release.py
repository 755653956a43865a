"""flaminko release: checks, fills in, cards that parse, remote code without the package, upload to a Hub on loopback."""

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard, ModelCardData, constants

from conftest import noise_image
from fake_hub import FakeHub
from flaminko.release import REMOTE_CODE, is_adapter, problems, release
from test_cli import assert_one_line_error, closed_port_endpoint, flaminko
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
    assert "model.safetensors" in printed and "base_model: left out" in printed  # the backbones are local folders
    assert printed.splitlines()[-1].startswith(f"ready to push: {len(files)} files, ")
    assert {"config.json", "model.safetensors", "modeling_flaminko.py", "README.md", "processor_config.json"} <= set(files)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["language"] == ["ko", "en"] and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text" and "flaminko" in data["tags"]
    assert "cross_attn_every_n_layers" in card.text and "trust_remote_code=True" in card.text
    assert "## Limitations" in card.text and "한국어" in card.text
    assert card.text.strip().splitlines()[0] == "# tiny-ko" and 'from_pretrained("flaminko/tiny-ko"' in card.text
    assert "base_model" not in data and data["license"] == "apache-2.0" and "pip install flaminko" not in card.text


def test_a_second_release_of_a_ready_folder_changes_and_adds_nothing(model_and_processor, tmp_path, capsys):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    release(folder, "flaminko/tiny-ko")
    assert "added: README.md (model card for flaminko/tiny-ko)" in capsys.readouterr().out
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    release(folder, "flaminko/tiny-ko")
    printed = capsys.readouterr().out
    assert "added:" not in printed and "updated:" not in printed, printed
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    release(folder, "flaminko/tiny-ko-v2")  # another repo id: the card's title and snippets change
    assert "updated: README.md (model card for flaminko/tiny-ko-v2)" in capsys.readouterr().out


def test_folder_that_cannot_be_completed_is_refused(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    (folder / "processor_config.json").unlink()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match="processor: processor_config.json missing"):
        release(folder, "flaminko/tiny-ko")
    assert sorted(p.name for p in folder.iterdir()) == before  # checked before anything was written


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
        result = flaminko(
            "release", folder, "--repo-id", "flaminko/tiny-ko", "--push", "--private", "--license", "mit",
            "--base-model", "openai/clip-vit-large-patch14", "--base-model", "EleutherAI/polyglot-ko-1.3b", env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("pushed: ")
    repo = hub.repos["flaminko/tiny-ko"]
    assert repo["private"]
    local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert repo["files"] == local
    assert "auto_map" in json.loads(repo["files"]["config.json"])
    assert hub.validated and hub.validated[-1]["pipeline_tag"] == "image-text-to-text"
    assert hub.validated[-1]["license"] == "mit"
    assert hub.validated[-1]["base_model"] == ["openai/clip-vit-large-patch14", "EleutherAI/polyglot-ko-1.3b"]


def test_push_without_a_network_is_one_line(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    refused = flaminko("release", folder, "--repo-id", "flaminko/tiny-ko", "--push", env={"HF_ENDPOINT": closed_port_endpoint(), "HF_TOKEN": "hf_x"})
    assert_one_line_error(refused, "release", "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE=1")
    offline = flaminko("release", folder, "--repo-id", "flaminko/tiny-ko", "--push", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"})
    assert_one_line_error(offline, "release", "offline")


def test_release_refuses_what_is_not_a_model_folder_without_touching_it(model_and_processor, tmp_path):
    model, processor = model_and_processor
    run = tmp_path / "runs" / "ko"
    bare_folder(model, processor, run / "final")
    (run / "notes.txt").write_text("x")
    before = sorted(str(p) for p in run.rglob("*"))
    assert_one_line_error(flaminko("release", run, "--repo-id", "me/ko"), "release", "not a model folder", f"did you mean {run / 'final'}?")
    assert_one_line_error(flaminko("release", tmp_path / "nope", "--repo-id", "me/ko"), "release", "no such folder")
    assert_one_line_error(flaminko("release", run / "final", "--repo-id", "bad id with spaces"), "release", "is not a Hub repo id")
    assert_one_line_error(flaminko("release", run / "final", "--repo-id", "me/ko", "--base-model", "runs/ko/base-model"), "release", "is not a Hub repo id")
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_cards_pass_the_hubs_metadata_validation(model_and_processor, tmp_path, monkeypatch):
    """huggingface_hub's own ModelCard.validate, against the loopback Hub (which rejects paths as
    base_model, as the Hub does)."""
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    release(folder, "flaminko/tiny-ko", base_models=["EleutherAI/polyglot-ko-1.3b"])
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        ModelCard.load(folder / "README.md").validate()
        assert hub.validated[-1]["base_model"] == ["EleutherAI/polyglot-ko-1.3b"]
        local = ModelCard(f"---\n{ModelCardData(license='mit', language='ko', library_name='transformers', pipeline_tag='image-text-to-text', base_model='runs/ko/base-model').to_yaml()}\n---\n# x")
        with pytest.raises(ValueError, match="not a valid model id"):
            local.validate()


def test_peft_adapter_releases_with_a_card_naming_its_base(model_and_processor, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = model_and_processor
    base = tmp_path / "base"
    model.save_pretrained(base)
    model.name_or_path = str(base)
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=r"language_model\.gpt_neox\.layers\.\d+\.attention\.query_key_value"))
    adapter.save_pretrained(tmp_path / "adapter")
    assert is_adapter(tmp_path / "adapter")
    untouched = (tmp_path / "adapter" / "README.md").read_text()
    with pytest.raises(ValueError, match="release the base model first, then give --base-model"):
        release(tmp_path / "adapter", "flaminko/tiny-ko-lora")
    assert (tmp_path / "adapter" / "README.md").read_text() == untouched
    release(tmp_path / "adapter", "flaminko/tiny-ko-lora", base_models=["flaminko/tiny-ko"])
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "flaminko/tiny-ko" and card.data.library_name == "peft"
    assert 'from_pretrained("flaminko/tiny-ko"' in card.text and 'PeftModel.from_pretrained(base, "flaminko/tiny-ko-lora")' in card.text
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "flaminko/tiny-ko"
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
    release(final, "me/ko-captioner")
    card = ModelCard.load(final / "README.md")
    assert card.text.strip().splitlines()[0] == "# ko-captioner" and "## Training" in card.text and "flaminko train" in card.text
    assert 'from_pretrained("me/ko-captioner"' in card.text


def test_a_users_own_card_with_a_path_as_base_model_is_refused_untouched(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = bare_folder(model, processor, tmp_path / "model")
    own = ModelCard(f"---\n{ModelCardData(license='mit', base_model='runs/ko/base-model').to_yaml()}\n---\n# my model\n")
    own.save(folder / "README.md")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="base_model holds local paths the Hub rejects"):
        release(folder, "me/ko")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
