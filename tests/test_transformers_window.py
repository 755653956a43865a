"""The declared transformers window: the cache's name on each release, the deprecated keyword, no
FutureWarning from Flaminko's own code, and one line naming the window on a release outside it
(the package and the remote code shipped in every saved folder)."""

import configparser
import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement

from conftest import noise_image
from flaminko.configuration_flaminko import CACHE_NAME, TRANSFORMERS_WINDOW
from flaminko.hub_card import build_model_card, parameter_counts

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<image>빨간색 원<|endofchunk|><image>파란색"


def test_install_requires_is_the_window():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].split("\n") if line.strip()]
    (pinned,) = [requirement for requirement in requirements if requirement.name == "transformers"]
    assert str(pinned.specifier) == str(Requirement(f"transformers{TRANSFORMERS_WINDOW}").specifier)
    assert transformers.__version__ in pinned.specifier


def test_the_cache_travels_under_the_installed_transformers_name(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text=PROMPT, images=[noise_image(1), noise_image(2)])
    with torch.no_grad():
        output = model(**batch, use_cache=True)
    assert CACHE_NAME == ("cache" if transformers.__version__ >= "5.24" else "past_key_values")
    assert list(output.keys())[:2] == ["logits", CACHE_NAME]
    assert output.to_tuple()[1] is getattr(output, CACHE_NAME)


def test_past_key_values_is_still_accepted_and_deprecated_from_5_24(model_and_processor):
    model, processor = model_and_processor
    batch = processor(text=PROMPT, images=[noise_image(1), noise_image(2)])
    ids = batch["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :-2], pixel_values=batch["pixel_values"], use_cache=True)
        step = dict(
            input_ids=ids[:, -2:],
            image_features=first.image_features,
            media_key_values=first.media_key_values,
            past_image_token_count=first.image_token_count,
        )
        cache = getattr(first, CACHE_NAME)
        by_new_name = model(cache=copy.deepcopy(cache), **step).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            by_old_name = model(past_key_values=copy.deepcopy(cache), **step).logits
        with pytest.raises(ValueError, match="not both"):
            model(cache=copy.deepcopy(cache), past_key_values=copy.deepcopy(cache), **step)
    assert torch.equal(by_old_name, by_new_name)
    deprecations = [warning for warning in caught if issubclass(warning.category, FutureWarning)]
    assert len(deprecations) == (CACHE_NAME == "cache")


def test_no_future_warning_from_flaminko(model_and_processor, tmp_path):
    """generate (greedy, beams, static cache), a training step, save and load: transformers' own
    deprecation notices would name Flaminko's calls."""
    model, processor = model_and_processor
    batch = processor(text=[PROMPT, "<image>파란색"], images=[[noise_image(1), noise_image(2)], [noise_image(3)]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model.generate(**batch, max_new_tokens=3, do_sample=False)
        model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static", disable_compile=True)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        model.eval()
        model.save_pretrained(tmp_path / "saved")
        type(model).from_pretrained(tmp_path / "saved")


def run_outside_window(version: str, body: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """Runs body where transformers reports `version` (sys.argv[2:] are args) until its lazy module
    is rebuilt (the first `from transformers import ...` of a submodule), which is enough for the
    shipped files: they read the version first."""
    script = "import sys\nimport transformers\ntransformers.__version__ = sys.argv[1]\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, version, *map(str, args)], capture_output=True, text=True, **kwargs
    )


@pytest.mark.parametrize("version", ["5.22.0", "5.26.0", "6.0.0"])
def test_a_release_outside_the_window_is_named_at_import(version):
    result = run_outside_window(
        version,
        """
        try:
            import flaminko.configuration_flaminko
        except ImportError as error:
            print(error)
        """,
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert TRANSFORMERS_WINDOW in line and version in line


def test_remote_code_outside_the_window_names_it(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "release")
    processor.save_pretrained(tmp_path / "release")
    result = run_outside_window(
        "5.26.0",
        """
        sys.modules["flaminko"] = None  # the package must not be importable here
        from transformers import AutoModelForImageTextToText
        try:
            AutoModelForImageTextToText.from_pretrained(sys.argv[2], trust_remote_code=True)
        except ImportError as error:
            print(str(error).splitlines()[-1])
        """,
        tmp_path / "release",
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert TRANSFORMERS_WINDOW in result.stdout and "5.26.0" in result.stdout


def test_the_model_card_names_the_window(model_and_processor):
    model, _ = model_and_processor
    total, trained = parameter_counts(model)
    card = str(build_model_card(model.config, total_parameters=total, trained_parameters=trained))
    assert f"transformers{TRANSFORMERS_WINDOW}" in card
