"""Parity with OpenFlamingo's own code: random reference models around tiny GPT-NeoX and LLaMA,
saved the way OpenFlamingo's training saves them, converted, compared."""

import sys
import types
from argparse import Namespace

import pytest
import torch
from torch import nn

pytest.importorskip("einops_exts")
from flaminko import FlaminkoForConditionalGeneration  # noqa: E402
from flaminko.conversion import convert_open_flamingo, load_state_dict  # noqa: E402
from flaminko.conversion.reference import build_open_flamingo, compare_with_open_flamingo  # noqa: E402


def open_flamingo_train_utils():
    # train_utils imports wandb at the top, unused when saving. The stand-in leaves once it is imported: later
    # in the session, libraries that look for wandb (TRL's trainers) would take it for the real one.
    stand_in = "wandb" not in sys.modules
    if stand_in:
        sys.modules["wandb"] = types.ModuleType("wandb")
    try:
        from open_flamingo.train import train_utils
    finally:
        if stand_in:
            del sys.modules["wandb"]
    return train_utils


class DistributedLike(nn.Module):
    """Names parameters `module.*`, as DistributedDataParallel does in OpenFlamingo's training."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def trained_reference(backbones, family, every_n, seed):
    torch.manual_seed(seed)
    model, tokenizer = build_open_flamingo(backbones["vision"], backbones[family], every_n)
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.uniform_(0.3, 0.9)
                block.ff_gate.uniform_(-0.9, -0.3)
        embedding = model.lang_encoder.get_input_embeddings().weight
        for token in ("<|endofchunk|>", "<image>"):
            embedding[tokenizer.convert_tokens_to_ids(token)] += 0.5 * torch.randn(embedding.shape[1])
    return model


def save_like_open_flamingo_training(model, folder):
    train_utils = open_flamingo_train_utils()
    wrapped = DistributedLike(model)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    args = Namespace(fsdp=False, rank=0, run_name=str(folder), delete_previous_checkpoint=False, report_to_wandb=False)
    train_utils.save_checkpoint(wrapped, optimizer, scheduler, 0, args)
    return next(folder.glob("checkpoint_*.pt"))


@pytest.mark.parametrize("family, every_n", [("gpt_neox", 1), ("gpt_neox", 2), ("llama", 1), ("llama", 2)])
def test_training_checkpoint_converts_to_the_same_model(backbones, tmp_path, family, every_n):
    reference = trained_reference(backbones, family, every_n, seed=every_n)
    checkpoint_path = save_like_open_flamingo_training(reference, tmp_path / "run")
    raw = torch.load(checkpoint_path, weights_only=True)
    assert set(raw) >= {"epoch", "model_state_dict", "optimizer_state_dict"}
    assert all(key.startswith("module.") for key in raw["model_state_dict"])

    # Saved under transformers 5, the output layer is `lm_head` (no "embed" in its name), which
    # OpenFlamingo's filter drops: the new tokens' output rows are missing, and the converter says so.
    out = tmp_path / "flaminko"
    with pytest.raises(ValueError, match="no rows for the new tokens"):
        convert_open_flamingo(checkpoint_path, backbones["vision"], backbones[family], out, cross_attn_every_n_layers=every_n)
    summary = convert_open_flamingo(
        checkpoint_path, backbones["vision"], backbones[family], out, cross_attn_every_n_layers=every_n, init_missing_token_rows=True
    )
    assert summary.initialised and summary.tensors_mapped > 0
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    original_vocab = reference.lang_encoder.get_input_embeddings().weight.shape[0] - 3
    difference = compare_with_open_flamingo(
        out, load_state_dict(checkpoint_path), backbones["vision"], backbones[family], every_n, initialised_from_row=original_vocab
    )
    print("max abs logits difference", difference)
    assert difference <= 1e-4


def test_released_gpt_neox_checkpoint_with_transformers_4_names(backbones, tmp_path):
    """A flat checkpoint.pt as released (and as OpenFlaminKO's training wrote it under transformers 4),
    where GPT-NeoX's output layer is `embed_out`: converted with no rows left to invent."""
    reference = trained_reference(backbones, "gpt_neox", 1, seed=3)
    state = save_like_open_flamingo_training(reference, tmp_path / "run")
    flat = {k.removeprefix("module."): v for k, v in torch.load(state, weights_only=True)["model_state_dict"].items()}
    flat["lang_encoder.embed_out.weight"] = reference.lang_encoder.get_output_embeddings().weight.detach().clone()
    path = tmp_path / "checkpoint.pt"
    torch.save(flat, path)
    out = tmp_path / "flaminko"
    summary = convert_open_flamingo(path, backbones["vision"], backbones["gpt_neox"], out)
    assert summary.initialised == []
    assert compare_with_open_flamingo(out, flat, backbones["vision"], backbones["gpt_neox"], 1) <= 1e-4


def test_unplaceable_keys_and_unfilled_weights_are_listed(backbones, tmp_path):
    reference = trained_reference(backbones, "gpt_neox", 1, seed=4)
    flat = {k: v for k, v in reference.state_dict().items() if k.startswith(("perceiver.", "lang_encoder.gpt_neox.layers"))}
    flat = {k: v for k, v in flat.items() if "gated_cross_attn_layer" in k or k.startswith("perceiver.")}
    flat["lang_encoder.something_new.weight"] = torch.zeros(2)
    path = tmp_path / "extra.pt"
    torch.save(flat, path)
    with pytest.raises(ValueError, match="something_new"):
        convert_open_flamingo(path, backbones["vision"], backbones["gpt_neox"], tmp_path / "a", init_missing_token_rows=True)
    del flat["lang_encoder.something_new.weight"]
    del flat["perceiver.latents"]
    torch.save(flat, path)
    with pytest.raises(ValueError, match="unfilled: \\['perceiver.latents'\\]"):
        convert_open_flamingo(path, backbones["vision"], backbones["gpt_neox"], tmp_path / "b", init_missing_token_rows=True)


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "hook": Namespace(a=1)}, path)
    with pytest.raises(ValueError, match="Refusing to load"):
        load_state_dict(path)


def test_openflaminko_readme_loading_runs_unchanged(backbones, tmp_path):
    """OpenFlaminKO's README: create_model_and_transforms, then load_state_dict(torch.load(ckpt), strict=False)."""
    from flaminko import create_model_and_transforms

    reference = trained_reference(backbones, "gpt_neox", 1, seed=6)
    checkpoint_path = save_like_open_flamingo_training(reference, tmp_path / "run")
    out = tmp_path / "converted"
    convert_open_flamingo(checkpoint_path, backbones["vision"], backbones["gpt_neox"], out, init_missing_token_rows=True)

    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=str(backbones["vision"]),
        clip_vision_encoder_pretrained="openai",
        lang_encoder_path=str(backbones["gpt_neox"]),
        tokenizer_path=str(backbones["gpt_neox"]),
        cross_attn_every_n_layers=1,
    )
    model.load_state_dict(torch.load(checkpoint_path)["model_state_dict"], strict=False)
    model.eval()
    converted = FlaminkoForConditionalGeneration.from_pretrained(out).eval()
    vision_x = torch.randn(1, 2, 1, 3, 32, 32)
    lang_x = tokenizer(["<image>해당 이미지는 욕실 세면대입니다.<|endofchunk|><image>해당 이미지는"], return_tensors="pt")
    with torch.no_grad():
        ours = model(input_ids=lang_x["input_ids"], pixel_values=vision_x).logits
        theirs = converted(input_ids=lang_x["input_ids"], pixel_values=vision_x).logits
    assert torch.equal(ours, theirs)


REMOTE_LOAD_SCRIPT = """
import sys
sys.modules["flaminko"] = None  # the package must not be importable here
import torch
from transformers import AutoModelForImageTextToText
folder, checkpoint, inputs, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
model.load_state_dict(torch.load(checkpoint)["model_state_dict"], strict=False)  # OpenFlaminKO's line
with torch.no_grad():
    torch.save(model.eval()(**torch.load(inputs)).logits, out)
"""


def test_openflaminko_checkpoint_loads_into_a_remote_code_model_without_the_package(backbones, tmp_path):
    import subprocess

    reference = trained_reference(backbones, "gpt_neox", 1, seed=7)
    checkpoint_path = save_like_open_flamingo_training(reference, tmp_path / "run")
    convert_open_flamingo(checkpoint_path, backbones["vision"], backbones["gpt_neox"], tmp_path / "converted", init_missing_token_rows=True)
    fresh, processor = FlaminkoForConditionalGeneration.from_backbones(backbones["vision"], backbones["gpt_neox"])
    fresh.save_pretrained(tmp_path / "fresh")
    inputs = dict(processor(text="<image>해당 이미지는<|endofchunk|><image>", images=[torch.rand(3, 32, 32), torch.rand(3, 32, 32)]))
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(REMOTE_LOAD_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    # The logits are compared bit for bit: both processes sum in the same order only with the same thread count.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    arguments = [tmp_path / "fresh", checkpoint_path, tmp_path / "inputs.pt", tmp_path / "logits.pt"]
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), *map(str, arguments)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    converted = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "converted").eval()
    with torch.no_grad():
        expected = converted(**inputs).logits
        before = fresh.eval()(**inputs).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert not torch.allclose(before, expected)  # the checkpoint changed what the fresh model computes


@pytest.mark.parametrize("convention", ["openflamingo", "open_clip-2.23"])
def test_cli_converts_and_verifies_with_a_hugging_face_clip(backbones, tmp_path, capsys, convention):
    from flaminko.cli import main

    reference = trained_reference(backbones, "gpt_neox", 1, seed=5)
    checkpoint = save_like_open_flamingo_training(reference, tmp_path / "run")
    argv = ["convert", "open-flamingo", "--checkpoint", str(checkpoint), "--vision", str(backbones["vision"]),
            "--lm", str(backbones["gpt_neox"]), "--init-missing-token-rows", "--vision-convention", convention,
            "--verify", "--out", str(tmp_path / "out")]
    main(argv)
    printed = capsys.readouterr().out
    assert "tensors mapped:" in printed and "bytes written:" in printed
    difference = float(printed.split("max |logits diff| vs reference:")[1].split()[0])
    assert difference <= 1e-4
