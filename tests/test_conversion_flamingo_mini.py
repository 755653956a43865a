"""flamingo-mini checkpoints, written in its documented layout (its code cannot be installed here)."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from conftest import noise_image
from flaminko import FlaminkoForConditionalGeneration, FlaminkoProcessor
from flaminko.conversion.flamingo_mini import convert_flamingo_mini

HEADS, DIM_HEAD, MULT, LATENTS, TIME_EMBEDS = 2, 8, 2, 4, 4


def flamingo_mini_folder(folder, backbones, family, every):
    """config.json + pytorch_model.bin as flamingo-mini's save_pretrained writes them."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(backbones[family])
    tokenizer = AutoTokenizer.from_pretrained(backbones[family])
    lm.resize_token_embeddings(len(tokenizer) + 1)  # flamingo-mini's <EOC>
    vision = CLIPVisionModel.from_pretrained(backbones["vision"])
    dim, dim_visual, inner = lm.config.hidden_size, vision.config.hidden_size, HEADS * DIM_HEAD
    state = {}
    for name, tensor in lm.base_model.state_dict().items():
        match = re.fullmatch(r"(h|decoder\.layers)\.(\d+)\.(.+)", name)
        if match and int(match.group(2)) % every == 0:
            name = f"{match.group(1)}.{match.group(2)}.lm_block.{match.group(3)}"
        state[f"flamingo.lm.{name}"] = tensor
    state["flamingo.lm_head.weight"] = lm.lm_head.weight
    shapes = {"latents": (LATENTS, dim_visual), "time_pos_emb": (TIME_EMBEDS, 1, dim_visual), "norm.weight": (dim_visual,), "norm.bias": (dim_visual,)}
    for i in range(2):
        layer = f"layers.{i}"
        for norm in ("0.norm_media", "0.norm_latents", "1.0"):
            shapes[f"{layer}.{norm}.weight"] = shapes[f"{layer}.{norm}.bias"] = (dim_visual,)
        for projection in ("to_q", "to_k", "to_v"):
            shapes[f"{layer}.0.{projection}.weight"] = (inner, dim_visual)
        shapes[f"{layer}.0.to_out.weight"] = (dim_visual, inner)
        shapes[f"{layer}.1.1.weight"] = (dim_visual * MULT, dim_visual)
        shapes[f"{layer}.1.3.weight"] = (dim_visual, dim_visual * MULT)
    state.update({f"flamingo.resampler.{name}": torch.randn(shape) for name, shape in shapes.items()})
    layers_key = "h" if family == "gpt2" else "decoder.layers"
    for i in range(0, lm.config.num_hidden_layers, every):
        block = f"flamingo.lm.{layers_key}.{i}.xattn_block"
        block_shapes = {
            "attn.norm.weight": (dim,), "attn.norm.bias": (dim,), "attn.to_q.weight": (inner, dim),
            "attn.to_kv.weight": (2 * inner, dim_visual), "attn.to_out.weight": (dim, inner),
            "alpha_attn": (1,), "alpha_ffw": (1,), "ffw.0.weight": (dim,), "ffw.0.bias": (dim,),
            "ffw.1.weight": (dim * MULT, dim), "ffw.3.weight": (dim, dim * MULT),
        }
        state.update({f"{block}.{name}": 0.3 * torch.randn(shape) for name, shape in block_shapes.items()})
    # Saved by transformers 4, whose CLIPVisionModel nested its weights under vision_model.
    state.update({f"flamingo.vision_encoder.vision_model.{name}": t for name, t in vision.state_dict().items()})
    config = {
        "lm": str(backbones[family]), "clip_model_type": str(backbones["vision"]), "dim": dim, "dim_visual": dim_visual,
        "xattn_every": every, "xattn_dim_head": DIM_HEAD, "xattn_heads": HEADS, "xattn_ff_mult": MULT, "xattn_act": "sqrelu",
        "resampler_depth": 2, "resampler_dim_head": DIM_HEAD, "resampler_heads": HEADS, "resampler_num_latents": LATENTS,
        "resampler_num_time_embeds": TIME_EMBEDS, "resampler_ff_mult": MULT, "resampler_act": "gelu", "model_type": "flamingo",
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({k: v.detach().clone() for k, v in state.items()}, folder / "pytorch_model.bin")
    return state, lm.config.num_hidden_layers


@pytest.mark.parametrize("family, every", [("gpt2", 1), ("opt", 2)])
def test_flamingo_mini_checkpoint_lands_where_its_layout_says(backbones, tmp_path, family, every):
    state, num_layers = flamingo_mini_folder(tmp_path / "mini", backbones, family, every)
    summary = convert_flamingo_mini(tmp_path / "mini", tmp_path / "out")
    assert summary.tensors_mapped > 0
    model = FlaminkoForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = FlaminkoProcessor.from_pretrained(tmp_path / "out")
    ours = model.state_dict()
    assert sorted(map(int, model.cross_attn_layers)) == list(range(0, num_layers, every))
    layers_key = "h" if family == "gpt2" else "decoder.layers"
    block = f"flamingo.lm.{layers_key}.{every if every > 1 else 1}.xattn_block"
    index = every if every > 1 else 1
    assert torch.equal(ours[f"cross_attn_layers.{index}.attn_gate"], state[f"{block}.alpha_attn"])
    assert torch.equal(ours[f"cross_attn_layers.{index}.ff.down_proj.weight"], state[f"{block}.ffw.3.weight"])
    assert torch.equal(
        ours["perceiver.layers.1.attention.to_kv.weight"],
        torch.cat([state["flamingo.resampler.layers.1.0.to_k.weight"], state["flamingo.resampler.layers.1.0.to_v.weight"]]),
    )
    assert torch.equal(ours["perceiver.frame_embeddings"], state["flamingo.resampler.time_pos_emb"][:, 0])
    assert model.config.vision_feature_include_cls and model.config.cross_attn_ff_act == "relu2"
    input_embedding = model.get_input_embeddings().weight
    assert torch.equal(input_embedding, state["flamingo.lm.wte.weight" if family == "gpt2" else "flamingo.lm.decoder.embed_tokens.weight"])
    # flamingo-mini's prompt: the image placeholder is plain text; its "<" marks the image.
    batch = processor(text="<image>a red circle<EOC>", images=[noise_image(1)])
    assert batch["input_ids"][0, 0] == model.config.media_token_id == processor.tokenizer.convert_tokens_to_ids("<")
    assert processor.tokenizer.convert_ids_to_tokens(model.config.eoc_token_id) == "<EOC>"
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1
    with pytest.raises(ValueError, match="marks 2 images but has 1"):
        processor(text="<image>a < b", images=[noise_image(1)])


def test_flamingo_mini_checkpoint_with_foreign_keys_is_refused(backbones, tmp_path):
    flamingo_mini_folder(tmp_path / "mini", backbones, "gpt2", 1)
    state = torch.load(tmp_path / "mini" / "pytorch_model.bin", weights_only=True)
    state["flamingo.extra.weight"] = torch.zeros(1)
    del state["flamingo.resampler.latents"]
    torch.save(state, tmp_path / "mini" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"(?s)flamingo\.extra\.weight.*perceiver\.latents"):
        convert_flamingo_mini(tmp_path / "mini", tmp_path / "out")
