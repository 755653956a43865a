"""Save/load, Auto classes, remote code without the package, dtypes, device_map, from_backbones."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

from conftest import build_model, noise_image
from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration, FlaminkoProcessor, tiny
from flaminko.release import REMOTE_CODE

PROMPT = "<image>빨간색 원<|endofchunk|><image>파란색"


def sample(processor):
    return processor(text=PROMPT, images=[noise_image(1), noise_image(2)])


@pytest.mark.parametrize("family", tiny.TEXT_FAMILIES)
def test_save_and_load_round_trip(backbones, family, tmp_path):
    model, processor = build_model(backbones, family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, FlaminkoForConditionalGeneration)
    assert isinstance(loaded_processor, FlaminkoProcessor)
    batch = sample(processor)
    assert torch.equal(loaded_processor(text=PROMPT, images=[noise_image(1), noise_image(2)])["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert loaded.generation_config.eos_token_id[0] == model.config.eoc_token_id


def test_config_round_trips_and_defaults_are_openflaminko():
    config = FlaminkoConfig()
    assert config.vision_config.hidden_size == 1024 and config.vision_config.patch_size == 14
    assert config.text_config.model_type == "gpt_neox" and config.text_config.hidden_size == 2048
    assert config.text_config.num_hidden_layers == 24 and config.text_config.vocab_size == 30080
    assert config.cross_attn_layer_indices == list(range(24))
    custom = FlaminkoConfig(cross_attn_every_n_layers=4, max_num_frames=8, media_token_id=7, only_attend_immediate_media=False)
    again = FlaminkoConfig.from_dict(custom.to_dict())
    assert again.to_dict() == custom.to_dict()
    assert again.cross_attn_layer_indices == [3, 7, 11, 15, 19, 23]
    assert isinstance(AutoConfig.for_model("flaminko"), FlaminkoConfig)


def test_sharded_safetensors(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = FlaminkoForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = sample(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_generates(model_and_processor, tmp_path, dtype):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    loaded = FlaminkoForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    out = loaded.generate(**sample(processor), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == sample(processor)["input_ids"].shape[1] + 4 or out[0, -1] in loaded.generation_config.eos_token_id


def test_device_map_auto_loads_and_generates(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    loaded = FlaminkoForConditionalGeneration.from_pretrained(tmp_path, device_map="auto").eval()
    # A tiny model fits whole on the first accelerator when there is one, else on the CPU.
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    expected = accelerator.type if accelerator is not None else "cpu"
    assert {p.device.type for p in loaded.parameters()} == {expected}
    batch = sample(processor)
    on_device = {name: tensor.to(loaded.device) for name, tensor in batch.items()}
    generated = loaded.generate(**on_device, max_new_tokens=5, do_sample=False).cpu()
    assert torch.equal(generated, model.generate(**batch, max_new_tokens=5, do_sample=False))


def test_auto_model_and_auto_map_cover_the_four_auto_classes(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor"}
    # The code files transformers copies (the model's relative imports) are those a release checks for.
    assert sorted(path.name for path in tmp_path.glob("*.py")) == sorted(REMOTE_CODE)
    assert isinstance(AutoModel.from_pretrained(tmp_path), FlaminkoForConditionalGeneration)


def test_from_backbones_keeps_the_pretrained_weights(backbones):
    model, processor = build_model(backbones, "gpt_neox")
    original_lm = AutoModelForCausalLM.from_pretrained(backbones["gpt_neox"])
    original_vision = CLIPVisionModel.from_pretrained(backbones["vision"])
    lm_state = model.language_model.state_dict()
    for name, tensor in original_lm.state_dict().items():
        if lm_state[name].shape == tensor.shape:
            assert torch.equal(lm_state[name], tensor), name
        else:
            # Embedding matrices grew by the new special tokens; the old rows are untouched.
            assert torch.equal(lm_state[name][: tensor.shape[0]], tensor), name
    for name, tensor in original_vision.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    assert len(processor.tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert processor.tokenizer.convert_ids_to_tokens([model.config.eoc_token_id, model.config.media_token_id]) == [
        "<|endofchunk|>",
        "<image>",
    ]


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["flaminko"] = None  # the package must not be importable here
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    images = [Image.open(path) for path in sys.argv[2:]]
    batch = processor(text="<image>빨간색 원<|endofchunk|><image>파란색", images=images)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    # transformers' base model (what TRL's fused loss runs) comes with the remote code too.
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
        assert torch.allclose(model.get_output_embeddings()(hidden), model(**batch).logits, atol=1e-6)
    print(type(config).__name__, type(processor).__name__, out[0].tolist())
    """
)


def test_saved_folder_loads_as_remote_code_without_the_package(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = tmp_path / "release"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    paths = []
    for index in (1, 2):
        path = tmp_path / f"image{index}.png"
        noise_image(index).save(path)
        paths.append(str(path))
    script = tmp_path / "load.py"
    script.write_text(REMOTE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), *paths], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config_name, processor_name, tokens = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (config_name, processor_name) == ("FlaminkoConfig", "FlaminkoProcessor")
    expected = model.generate(**sample(processor), max_new_tokens=6, do_sample=False)[0].tolist()
    assert json.loads(tokens) == expected


def test_loading_initialises_no_weight(model_and_processor, tmp_path, monkeypatch):
    """from_pretrained builds on the meta device and fills every weight from the checkpoint once."""
    import transformers.initialization as hf_init

    model, _ = model_and_processor
    model.save_pretrained(tmp_path)
    initialised = []
    for name, function in list(hf_init.TORCH_INIT_FUNCTIONS.items()):
        def counting(tensor, *args, _function=function, **kwargs):
            initialised.append(tensor.numel())
            return _function(tensor, *args, **kwargs)
        monkeypatch.setitem(hf_init.TORCH_INIT_FUNCTIONS, name, counting)
    FlaminkoForConditionalGeneration.from_pretrained(tmp_path)
    assert sum(initialised) == 0
