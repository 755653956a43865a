"""Every released OpenFlamingo-family model, converted with its preset from local files: stand-ins
of each release's backbones built from their real config files (tests/fixtures/releases; MosaicGPT's
code written here from its published structure), its checkpoint laid out as the release has it
(GPT-NeoX and LLaMA checkpoints carrying transformers 4.28's buffers), compared with OpenFlamingo's
own code and loaded as remote code."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("einops_exts")
from test_conversion_open_flamingo import trained_reference  # noqa: E402
from transformers import MptConfig, MptForCausalLM  # noqa: E402

from flaminko import FlaminkoForConditionalGeneration, tiny  # noqa: E402
from flaminko.cli import PRESET_NAMES, main  # noqa: E402
from flaminko.conversion import convert_open_flamingo  # noqa: E402
from flaminko.conversion.mosaic_gpt import mpt_config_from_mosaic_gpt  # noqa: E402
from flaminko.checkpoint_mapping_flaminko import drop_recomputed_buffers  # noqa: E402
from flaminko.conversion.presets import PRESETS  # noqa: E402
from flaminko.release import model_card  # noqa: E402
from release_files import PADDED_VOCAB, release_config, save_clip_release, save_language_model_release  # noqa: E402

# MosaicGPT as mosaicml/examples v0.0.4 lays it out (examples/llm/src/models/mosaic_gpt and
# layers/{attention,gpt_blocks}.py): the same module names, QK LayerNorm over the full width on
# Wqkv's query and key thirds, ALiBi from its own alibi_bias, biases removed under no_bias, logits
# from the tied wte. And as its code meets transformers 5, being written for 4.x: a PreTrainedModel
# without GenerationMixin that never calls post_init(); past_key_values in, out and in its own
# prepare_inputs_for_generation and _reorder_cache, a list of one (key, value) tuple per block, each
# (batch, seq, d_model); the padding mask applied as ~attention_mask (a bool mask only); no labels.
MOSAIC_GPT_CODE = '''
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class MosaicGPTConfig(PreTrainedConfig):
    model_type = "mosaic_gpt"

    def __init__(self, d_model=2048, n_heads=16, n_layers=24, mlp_ratio=4, max_seq_len=2048, vocab_size=50368,
                 attn_qk_ln=False, attn_clip_qkv=None, softmax_scale=None, alibi=False, alibi_bias_max=8,
                 no_bias=False, logit_scale=None, use_cache=False, **kwargs):
        self.d_model, self.n_heads, self.n_layers, self.mlp_ratio = d_model, n_heads, n_layers, mlp_ratio
        self.max_seq_len, self.vocab_size, self.attn_qk_ln, self.attn_clip_qkv = max_seq_len, vocab_size, attn_qk_ln, attn_clip_qkv
        self.softmax_scale, self.alibi, self.alibi_bias_max = softmax_scale, alibi, alibi_bias_max
        self.no_bias, self.logit_scale, self.use_cache = no_bias, logit_scale, use_cache
        super().__init__(**kwargs)


def alibi_bias(n_heads, seq_len, alibi_bias_max=8):
    bias = torch.arange(1 - seq_len, 1, dtype=torch.float32).view(1, 1, 1, seq_len)
    m = torch.arange(1, n_heads + 1, dtype=torch.float32).mul(alibi_bias_max / n_heads)
    return bias * (1.0 / (2 ** m.view(1, n_heads, 1, 1)))


class MultiheadAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.clip_qkv, self.attn_qk_ln = config.n_heads, config.attn_clip_qkv, config.attn_qk_ln
        self.softmax_scale = config.softmax_scale or 1 / math.sqrt(config.d_model / config.n_heads)
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model)
        if config.attn_qk_ln:
            self.q_ln = nn.LayerNorm(config.d_model)
            self.k_ln = nn.LayerNorm(config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x, attn_bias, past_key_value):
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = qkv.chunk(3, dim=2)
        if self.attn_qk_ln:
            query, key = self.q_ln(query).to(query.dtype), self.k_ln(key).to(key.dtype)
        if past_key_value is not None:  # () at the first step, then the (key, value) so far
            if past_key_value:
                key, value = torch.cat([past_key_value[0], key], dim=1), torch.cat([past_key_value[1], value], dim=1)
            past_key_value = (key, value)
        b, s_q, d = query.shape
        s_k = key.shape[1]
        heads = lambda t: t.view(b, t.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)
        weight = heads(query).matmul(heads(key).transpose(-1, -2)) * self.softmax_scale + attn_bias[:, :, -s_q:, -s_k:]
        causal = ~torch.ones(s_k, s_k, dtype=torch.bool, device=x.device).tril()[-s_q:, -s_k:]
        weight = weight.masked_fill(causal.view(1, 1, s_q, s_k), torch.finfo(weight.dtype).min)
        out = torch.softmax(weight, dim=-1).matmul(heads(value)).transpose(1, 2).reshape(b, s_q, d)
        return self.out_proj(out), past_key_value


class GPTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.mlp_act = nn.GELU(approximate="none")
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x):
        return self.mlp_down(self.mlp_act(self.mlp_up(x)))


class GPTBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = MultiheadAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = GPTMLP(config)

    def forward(self, x, past_key_value=None, attn_bias=None, attention_mask=None, is_causal=True):
        attended, past_key_value = self.attn(self.ln_1(x), attn_bias, past_key_value)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), past_key_value


class MosaicGPT(PreTrainedModel):
    config_class = MosaicGPTConfig
    base_model_prefix = "mosaic_gpt"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(config.vocab_size, config.d_model)})
        self.transformer.update({"blocks": nn.ModuleList([GPTBlock(config) for _ in range(config.n_layers)])})
        self.transformer.update({"ln_f": nn.LayerNorm(config.d_model)})
        if config.no_bias:
            for module in self.modules():
                if isinstance(getattr(module, "bias", None), nn.Parameter):
                    module.register_parameter("bias", None)

    def forward(self, input_ids, past_key_values=None, attention_mask=None, prefix_mask=None, sequence_id=None,
                return_dict=None, output_attentions=None, output_hidden_states=None, use_cache=None):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        x = self.transformer.wte(input_ids)
        attn_bias = alibi_bias(self.config.n_heads, self.config.max_seq_len, self.config.alibi_bias_max).to(x.dtype)
        if attention_mask is not None:
            s_k = attention_mask.shape[-1]
            attn_bias = attn_bias[..., -s_k:].masked_fill(~attention_mask.view(-1, 1, 1, s_k), torch.finfo(x.dtype).min)
        if use_cache and past_key_values is None:
            past_key_values = [() for _ in self.transformer.blocks]
        for index, block in enumerate(self.transformer.blocks):
            past = past_key_values[index] if past_key_values is not None else None
            x, past = block(x, past_key_value=past, attn_bias=attn_bias)
            if past_key_values is not None:
                past_key_values[index] = past
        logits = F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "attention_mask": kwargs["attention_mask"].bool(),
                "past_key_values": past_key_values, "use_cache": kwargs.get("use_cache", True)}

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return [tuple(tensor.index_select(0, beam_idx) for tensor in layer) for layer in past_key_values]
'''

# mpt-1b-redpajama-200b's config.json (tests/fixtures/releases), at a tiny width, with the auto_map
# of the stand-in code above (the copy found has none).
MOSAIC_GPT_CONFIG = {
    **release_config("anas-awadalla/mpt-1b-redpajama-200b"),
    "auto_map": {"AutoConfig": "mosaic_gpt.MosaicGPTConfig", "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"},
}
# MosaicGPTConfig types its dropouts as floats (mosaicml/examples v0.0.4: attn_pdrop=0.0, ...), so a
# folder its own save_pretrained writes holds 0.0 where the released file holds 0.
AS_MOSAIC_GPT_WRITES_IT = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "emb_pdrop": 0.0}


def load_mosaic_gpt_module(folder):
    spec = importlib.util.spec_from_file_location("mosaic_gpt_standin", folder / "mosaic_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_mosaic_gpt(folder, **overrides):
    """A MosaicGPT folder as on the Hub: config.json with auto_map, its code, pytorch_model.bin, tokenizer."""
    folder.mkdir(parents=True)
    (folder / "mosaic_gpt.py").write_text(MOSAIC_GPT_CODE)
    config = {**MOSAIC_GPT_CONFIG, **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    module = load_mosaic_gpt_module(folder)
    model = module.MosaicGPT(module.MosaicGPTConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_ln.weight") or ".ln_" in name:
                parameter.uniform_(0.5, 1.5)  # not all ones, so that a norm left out shows
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny.train_tokenizer(tiny.shipped_text()).save_pretrained(folder)
    return folder


def gpt_neox_4_28_buffers(reference, prefix):
    """The persistent buffers transformers 4.28's GPT-NeoX layers carried, for each layer under `prefix`."""
    config = reference.lang_encoder.config
    positions = config.max_position_embeddings
    head_size = config.hidden_size // config.num_attention_heads
    dim = int(head_size * config.rope_parameters["partial_rotary_factor"])  # 4.28's rotary_pct
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    buffers = {}
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}.{i}.decoder_layer.attention"
        buffers[f"{layer}.bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
        buffers[f"{layer}.masked_bias"] = torch.tensor(-1e9)
        buffers[f"{layer}.rotary_emb.inv_freq"] = inv_freq.clone()
    return buffers


def release_state(reference, release: str) -> dict:
    """The checkpoint of one release, from an OpenFlamingo reference model."""
    state = reference.state_dict()
    trained = {k: v.clone() for k, v in state.items() if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k}
    embedding_name = next(k for k, p in reference.named_parameters() if p is reference.lang_encoder.get_input_embeddings().weight)
    trained[embedding_name] = state[embedding_name].clone()
    if "rpj3b" in release or release == "OpenFlaminKO":
        output = reference.lang_encoder.get_output_embeddings().weight.detach().clone()
        output[-3:] = 0.02 * torch.randn(3, output.shape[1])  # transformers 4.28 started new rows at random, not the mean
        trained["lang_encoder.embed_out.weight"] = output
    if release in ("OpenFlamingo-4B-vitl-rpj3b", "OpenFlaminKO"):  # saved under transformers 4.28 (OpenFlaminKO: <= 4.35)
        trained.update(gpt_neox_4_28_buffers(reference, "lang_encoder.gpt_neox.layers"))
    if release == "OpenFlamingo-9B-deprecated":
        # OpenFlamingo v0.1 saved both names of each block and LLaMA's per-layer rotary buffers.
        config = reference.lang_encoder.config
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        for i in range(config.num_hidden_layers):
            trained[f"lang_encoder.old_decoder_blocks.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
            trained[f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        for key in [k for k in trained if ".gated_cross_attn_layer." in k]:
            index, rest = key.split("lang_encoder.model.layers.")[1].split(".gated_cross_attn_layer.")
            trained[f"lang_encoder.gated_cross_attn_layers.{index}.{rest}"] = trained[key]
    return trained


@pytest.fixture(scope="module")
def release_language_models(backbones, tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    torch.manual_seed(0)
    return {
        "vision": save_clip_release(root / "clip-vit-large-patch14"),
        "mosaic_gpt": save_mosaic_gpt(root / "mpt-1b-redpajama-200b"),
        "mosaic_gpt_saved_by_its_code": save_mosaic_gpt(root / "mpt-1b-redpajama-200b-saved", **AS_MOSAIC_GPT_WRITES_IT),
        "mpt": save_language_model_release(root / "mpt-7b", "mosaicml/mpt-7b"),
        "polyglot_ko": save_language_model_release(root / "polyglot-ko-1.3b", "EleutherAI/polyglot-ko-1.3b"),
        "llama": save_language_model_release(root / "llama-7b-hf", "decapoda-research/llama-7b-hf"),
        # RedPajama-INCITE-3B's files could not be found (tests/fixtures/releases/README.md).
        "gpt_neox": backbones["gpt_neox"],
    }


RELEASE_LMS = {
    "OpenFlamingo-3B-vitl-mpt1b": "mosaic_gpt",
    # The -dolly LM's config.json could not be found; a fine-tune saved by MosaicGPT's own code has float dropouts.
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": "mosaic_gpt_saved_by_its_code",
    "OpenFlamingo-4B-vitl-rpj3b": "gpt_neox",
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": "gpt_neox",
    "OpenFlamingo-9B-vitl-mpt7b": "mpt",
    "OpenFlamingo-9B-deprecated": "llama",
    "OpenFlaminKO": "polyglot_ko",
}

REMOTE_GENERATE_SCRIPT = """
import sys
sys.modules["flaminko"] = None  # the package must not be importable here
import torch
from transformers import AutoModelForImageTextToText
folder, inputs, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = torch.load(inputs)
with torch.no_grad():
    logits = model(**inputs).logits
    tokens = [model.generate(**inputs, max_new_tokens=6, num_beams=beams) for beams in (1, 3)]
torch.save({"logits": logits, "tokens": tokens}, out)
"""


def test_the_cli_knows_every_preset():
    assert PRESET_NAMES == tuple(PRESETS)


@pytest.mark.parametrize("release", list(RELEASE_LMS))
def test_release_converts_with_its_preset_and_matches_open_flamingo(backbones, release_language_models, tmp_path, capsys, release):
    preset = PRESETS[release]
    language_model = release_language_models[RELEASE_LMS[release]]
    vision = release_language_models["vision"]
    reference = trained_reference({"vision": vision, "lm": language_model}, "lm", preset.cross_attn_every_n_layers, seed=11)
    checkpoint, state = tmp_path / "checkpoint.pt", release_state(reference, release)
    if release == "OpenFlaminKO":  # its training's own checkpoint: nested, under DDP's module. prefix
        state = {"epoch": 0, "model_state_dict": {f"module.{key}": tensor for key, tensor in state.items()}}
    torch.save(state, checkpoint)
    out = tmp_path / "converted"
    main(["convert", "open-flamingo", "--preset", release, "--checkpoint", str(checkpoint), "--lm", str(language_model),
          "--vision", str(vision), "--verify", "--out", str(out)])
    printed = capsys.readouterr().out
    difference = float(printed.split("max |logits diff| vs reference:")[1].split()[0])
    assert difference <= 1e-4, printed
    if release == "OpenFlamingo-4B-vitl-rpj3b":
        assert "left out:" in printed and "attention.masked_bias (4 keys)" in printed
    if release == "OpenFlamingo-9B-deprecated":
        assert "rotary_emb.inv_freq (4 keys)" in printed and "initialised:" in printed

    config = json.loads((out / "config.json").read_text())
    assert config["cross_attn_every_n_layers"] == preset.cross_attn_every_n_layers
    card = (out / "README.md").read_text()
    assert f"license: {preset.license}" in card and release in card
    # `flaminko release` rewrites the card for the repo: the licence and the released backbones stay.
    released = model_card(out, "org/converted").data
    assert released.license == preset.license
    assert released.base_model == [name for name in (preset.vision, preset.language_model) if name is not None]

    # The folder alone, as remote code where flaminko cannot be imported: same logits and tokens.
    model = FlaminkoForConditionalGeneration.from_pretrained(out).eval()
    size = model.config.vision_config.image_size
    processor_inputs = {"input_ids": torch.tensor([[model.config.media_token_id, 5, 9, 17]]), "pixel_values": torch.randn(1, 1, 3, size, size)}
    torch.save(processor_inputs, tmp_path / "inputs.pt")
    (tmp_path / "generate.py").write_text(REMOTE_GENERATE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "generate.py"), str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "remote.pt")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    with torch.no_grad():
        assert torch.allclose(remote["logits"], model(**processor_inputs).logits, atol=1e-6)
        for beams, tokens in zip((1, 3), remote["tokens"]):
            assert torch.equal(tokens, model.generate(**processor_inputs, max_new_tokens=6, num_beams=beams))


def test_from_backbones_builds_one_dtype_whatever_the_files_name(release_language_models):
    """mpt-7b's config.json names bfloat16, LLaMA-7B's float16, CLIP's float32: transformers 5 keeps
    each, and a model mixing them fails at its first matrix product."""
    for lm in ("mpt", "llama"):
        model, processor = FlaminkoForConditionalGeneration.from_backbones(release_language_models["vision"], release_language_models[lm])
        assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
        size = model.config.vision_config.image_size
        model(input_ids=torch.tensor([[model.config.media_token_id, 5]]), pixel_values=torch.randn(1, 1, 3, size, size))
    half, _ = FlaminkoForConditionalGeneration.from_backbones(release_language_models["vision"], release_language_models["mpt"], dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in half.parameters()} == {torch.bfloat16}


def test_buffers_transformers_5_recomputes_are_checked_and_left_out(backbones):
    from conftest import build_model

    model, _ = build_model(backbones, "gpt_neox")
    reference = trained_reference(backbones, "gpt_neox", 1, seed=2)
    buffers = gpt_neox_4_28_buffers(reference, "lang_encoder.gpt_neox.layers")
    positions = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    buffers["vision_encoder.embeddings.position_ids"] = torch.arange(positions).expand(1, -1)
    kept, left_out = drop_recomputed_buffers({**buffers, "perceiver.latents": torch.zeros(1)}, model)
    assert list(kept) == ["perceiver.latents"]
    assert "lang_encoder.gpt_neox.layers.*.decoder_layer.attention.bias (4 keys)" in left_out
    assert "vision_encoder.embeddings.position_ids (1 key)" in left_out
    assert drop_recomputed_buffers(buffers, model.to(torch.bfloat16))[1] == left_out  # --dtype bfloat16 rounds its own

    buffers["lang_encoder.gpt_neox.layers.2.decoder_layer.attention.rotary_emb.inv_freq"] *= 2  # another rotary base
    buffers["lang_encoder.gpt_neox.layers.0.decoder_layer.attention.masked_bias"] = torch.tensor(-1e4)
    with pytest.raises(ValueError, match=r"differ from what the model computes.*\(2\).*layers\.0\.decoder_layer\.attention\.masked_bias.*layers\.2\.decoder_layer\.attention\.rotary_emb\.inv_freq"):
        drop_recomputed_buffers(buffers, model)


def test_openflaminkos_own_loading_line_takes_a_checkpoint_with_4x_buffers(backbones, tmp_path):
    """create_model_and_transforms, then load_state_dict(torch.load(ckpt), strict=False), with the
    buffers a transformers <= 4.35 checkpoint carries: checked, left out, the same model as `convert`."""
    from flaminko import create_model_and_transforms

    reference = trained_reference(backbones, "gpt_neox", 1, seed=12)
    state = release_state(reference, "OpenFlaminKO")
    assert sum(key.endswith("rotary_emb.inv_freq") for key in state) == 4
    torch.save(state, tmp_path / "checkpoint.pt")
    convert_open_flamingo(tmp_path / "checkpoint.pt", backbones["vision"], backbones["gpt_neox"], tmp_path / "converted")
    model, _, tokenizer = create_model_and_transforms(
        str(backbones["vision"]), "openai", str(backbones["gpt_neox"]), str(backbones["gpt_neox"]), cross_attn_every_n_layers=1
    )
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt"), strict=False)
    converted = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "converted").eval()
    inputs = {"input_ids": tokenizer(["<image>해당 이미지는"], return_tensors="pt")["input_ids"], "pixel_values": torch.randn(1, 1, 3, 32, 32)}
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, converted(**inputs).logits)

    state["lang_encoder.gpt_neox.layers.1.decoder_layer.attention.rotary_emb.inv_freq"] *= 2
    with pytest.raises(ValueError, match=r"differ from what the model computes.*layers\.1\.decoder_layer\.attention\.rotary_emb\.inv_freq"):
        model.load_state_dict(state, strict=False)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale"),
        ({"alibi": False}, "alibi=False"),
        ({"alibi_bias_max": 16}, "alibi_bias_max=16"),
        ({"attn_clip_qkv": 6.0}, "attn_clip_qkv together with attn_qk_ln"),
        ({"n_heads": 6}, "n_heads=6"),
        ({"mlp_ratio": 2}, "mlp_ratio=2"),
        ({"no_bias": False}, "no_bias=False"),
        ({"prefix_lm": True}, "prefix_lm=True"),
        ({"max_seq_len": 256.5}, "max_seq_len=256.5 is not a whole number"),
    ],
)
def test_mosaic_gpt_settings_mpt_cannot_compute_are_refused(overrides, named):
    assert mpt_config_from_mosaic_gpt(MOSAIC_GPT_CONFIG)[0].attn_config.qk_ln
    with pytest.raises(ValueError, match=f"cannot be converted faithfully: .*{named}"):
        mpt_config_from_mosaic_gpt({**MOSAIC_GPT_CONFIG, **overrides})


def test_mosaic_gpt_numbers_take_the_types_mpt_declares_and_dropout_is_noted():
    """transformers' MptConfig is a strict dataclass: attn_pdrop is an int there, clip_qkv a float,
    the sizes ints. Values of the same meaning are taken in its types; dropout, which only acts in
    training, becomes none, and the summary line says what it was."""
    config, notes = mpt_config_from_mosaic_gpt(
        {**MOSAIC_GPT_CONFIG, "attn_qk_ln": False, "attn_clip_qkv": 8, "max_seq_len": 256.0, "attn_pdrop": 0.1, "resid_pdrop": 0.1}
    )
    assert config.attn_config.clip_qkv == 8.0 and config.max_seq_len == 256 and isinstance(config.max_seq_len, int)
    assert config.attn_config.attn_pdrop == 0 and config.resid_pdrop == 0.0
    assert notes == [
        "dropout: MosaicGPT's attn_pdrop=0.1, resid_pdrop=0.1, emb_pdrop=0 -> MPT attn_config.attn_pdrop=0, resid_pdrop=0.0, "
        "emb_pdrop=0.0 (transformers' MPT declares attn_pdrop an int; dropout does not change inference; fine-tuning runs without it)"
    ]
    MptConfig.from_dict(config.to_dict())  # what the converted folder's config.json loads back as


def test_mpt_settings_transformers_ignores_are_refused(backbones, tmp_path):
    folder = tmp_path / "mpt"
    config = MptConfig(d_model=32, n_heads=4, n_layers=4, max_seq_len=256, vocab_size=PADDED_VOCAB, attn_config={"alibi_bias_max": 16})
    MptForCausalLM(config).save_pretrained(folder)
    tiny.train_tokenizer(tiny.shipped_text()).save_pretrained(folder)
    with pytest.raises(ValueError, match="attn_config.alibi_bias_max=16"):
        convert_open_flamingo(tmp_path / "unused.pt", backbones["vision"], str(folder), tmp_path / "out")


def test_a_mosaic_gpt_folder_is_read_without_running_its_code(backbones, release_language_models, tmp_path):
    """Its code raises on import here: conversion never runs it (only --verify's reference would)."""
    folder = tmp_path / "mosaic"
    folder.mkdir()
    for path in release_language_models["mosaic_gpt"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "mosaic_gpt.py").write_text("raise RuntimeError('MosaicGPT code was run')\n")
    reference = trained_reference({"vision": backbones["vision"], "lm": release_language_models["mosaic_gpt"]}, "lm", 1, seed=4)
    torch.save(release_state(reference, "OpenFlamingo-3B-vitl-mpt1b"), tmp_path / "checkpoint.pt")
    summary = convert_open_flamingo(tmp_path / "checkpoint.pt", backbones["vision"], str(folder), tmp_path / "out", dtype="bfloat16")
    assert summary.dtype == "bfloat16"
    model = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.language_model.transformer.blocks[0].attn.q_ln.weight.dtype == torch.bfloat16
    norms = torch.load(release_language_models["mosaic_gpt"] / "pytorch_model.bin")
    assert torch.equal(model.language_model.transformer.blocks[3].attn.k_ln.weight.float(), norms["transformer.blocks.3.attn.k_ln.weight"].bfloat16().float())


def test_open_flamingos_mosaic_gpt_generates_through_its_own_tuple_cache(backbones, release_language_models, monkeypatch):
    """The reference runs MosaicGPT's own code as transformers 4.x did: with its config's use_cache=False
    every step recomputes the whole sequence; with use_cache=True its list of (key, value) tuples goes
    from step to step (one new token each) and its own _reorder_cache reorders it under beam search.
    Both give the same tokens."""
    from flaminko.conversion.reference import build_open_flamingo, probe_inputs

    model, tokenizer = build_open_flamingo(backbones["vision"], release_language_models["mosaic_gpt"], 1)
    model.eval()
    assert model.lang_encoder.generation_config.use_cache is False  # from its config.json, as under 4.x
    remote = next(cls for cls in type(model.lang_encoder).__mro__ if cls.__module__.startswith("transformers_modules"))
    forward, reorder, calls, reorders = remote.forward, remote._reorder_cache, [], []

    def recording_forward(self, input_ids, past_key_values=None, **kwargs):
        calls.append((input_ids.shape[1], type(past_key_values).__name__))
        return forward(self, input_ids, past_key_values=past_key_values, **kwargs)

    monkeypatch.setattr(remote, "forward", recording_forward)
    monkeypatch.setattr(remote, "_reorder_cache", staticmethod(lambda past, beam_idx: reorders.append(type(past)) or reorder(past, beam_idx)))
    vision_x, input_ids, attention_mask = probe_inputs(tokenizer, tiny.IMAGE_SIZE)
    common = {"max_new_tokens": 4, "eos_token_id": model.eoc_token_id, "pad_token_id": tokenizer.pad_token_id, "suppress_tokens": [model.media_token_id]}
    prompt = input_ids.shape[1]
    for beams in (1, 3):
        tokens = {}
        for use_cache in (False, True):
            calls.clear(), reorders.clear()
            with torch.no_grad():
                tokens[use_cache] = model.generate(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask, num_beams=beams, use_cache=use_cache, **common)
            steps = len(calls)
            if use_cache:
                assert calls == [(prompt, "NoneType")] + [(1, "list")] * (steps - 1)
                assert reorders == ([list] * steps if beams > 1 else [])
            else:
                assert calls == [(prompt + step, "NoneType") for step in range(steps)]
        assert torch.equal(tokens[False], tokens[True]) and tokens[True].shape[1] > prompt + 1


def test_a_tokenizer_other_than_the_checkpoints_is_refused(backbones, tmp_path):
    reference = trained_reference(backbones, "gpt_neox", 2, seed=5)
    torch.save(release_state(reference, "OpenFlamingo-4B-vitl-rpj3b-langinstruct"), tmp_path / "checkpoint.pt")
    arguments = (tmp_path / "checkpoint.pt", backbones["vision"], backbones["gpt_neox"], tmp_path / "out")
    longer = tiny.train_tokenizer(tiny.shipped_text())
    longer.add_tokens(["<extra>"])
    longer.save_pretrained(tmp_path / "longer")
    with pytest.raises(ValueError, match="The tokenizer has 404 tokens .* the checkpoint's embedding has 403 rows"):
        convert_open_flamingo(*arguments, cross_attn_every_n_layers=2, tokenizer=str(tmp_path / "longer"))
    # As long, but with a pad token of its own: OpenFlamingo added no <PAD>, so its ids are not the release's.
    padded = tiny.train_tokenizer(tiny.shipped_text())
    padded.add_special_tokens({"pad_token": "<pad>"})
    padded.save_pretrained(tmp_path / "padded")
    with pytest.raises(ValueError, match="<\\|endofchunk\\|> has id 401 but OpenFlamingo gave it 400"):
        convert_open_flamingo(*arguments, cross_attn_every_n_layers=2, tokenizer=str(tmp_path / "padded"), pad_token_added=True)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--preset", "OpenFlamingo-9B-deprecated"], "built on LLaMA-7B, whose weights cannot be downloaded for you"),
        (["--preset", "OpenFlaminKO"], "OpenFlaminKO released no checkpoint: pass your training checkpoint with --checkpoint"),
        (["--lm", "x"], "--checkpoint, --vision required without --preset"),
        (["--preset", "OpenFlaminKO", "--checkpoint", "{tmp}", "--verify", "--dtype", "bfloat16"], "--verify compares float32 logits"),
    ],
)
def test_convert_mistakes_end_in_one_line(tmp_path, capsys, arguments, message):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    with pytest.raises(SystemExit) as exited:
        main(["convert", "open-flamingo", *arguments, "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("flaminko convert: error: ") and message in error and error.count("\n") == 1


def test_presets_download_the_checkpoint_and_read_mosaic_gpt_without_its_code(monkeypatch, tmp_path):
    import fnmatch

    import huggingface_hub

    from flaminko.conversion.mosaic_gpt import download_without_code
    from flaminko.conversion.presets import resolve_preset

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: calls.append((repo, name)) or str(tmp_path / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns: calls.append((repo, allow_patterns)) or str(tmp_path))
    settings = resolve_preset("OpenFlamingo-3B-vitl-mpt1b")
    assert calls == [("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "checkpoint.pt")]
    assert settings["language_model"] == "anas-awadalla/mpt-1b-redpajama-200b" and settings["cross_attn_every_n_layers"] == 1
    assert settings["vision"] == "openai/clip-vit-large-patch14" and settings["convention"] == "openflamingo"
    assert resolve_preset("OpenFlamingo-9B-deprecated", language_model="llama-7b")["init_missing_token_rows"]
    assert resolve_preset("OpenFlaminKO", checkpoint="ckpt.pt")["checkpoint_path"] == "ckpt.pt"
    assert [PRESETS[name].cross_attn_every_n_layers for name in PRESETS] == [1, 1, 2, 2, 4, 4, 1]
    download_without_code("anas-awadalla/mpt-1b-redpajama-200b")
    patterns = calls[-1][1]
    for wanted in ("config.json", "pytorch_model.bin", "tokenizer.json", "special_tokens_map.json"):
        assert any(fnmatch.fnmatch(wanted, pattern) for pattern in patterns)
    assert not any(fnmatch.fnmatch("mosaic_gpt.py", pattern) for pattern in patterns)
