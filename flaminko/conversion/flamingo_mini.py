"""flamingo-mini checkpoints (dhansmair/flamingo-mini: GPT-2 or OPT with CLIP) -> Flaminko.

flamingo-mini saves its whole model: `flamingo.resampler.*`, the LM as `flamingo.lm.*` with
`xattn_block` / `lm_block` wrappers, `flamingo.lm_head.weight` and `flamingo.vision_encoder.*`.
Its choices that Flaminko keeps: blocks before layers 0, n, 2n...; the resampler reads CLIP's last
hidden states with the CLS token and adds a time embedding per frame; `<EOC>` closes a caption;
the image placeholder is the plain text `<image>`, whose first token "<" marks the image.
"""

import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from ..configuration_flaminko import FlaminkoConfig
from ..modeling_flaminko import FlaminkoForConditionalGeneration, decoder_layers_path
from ..processing_flaminko import FlaminkoProcessor
from .checkpoint_io import ConversionSummary, load_state_dict, write_converted_folder

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "sqrelu": "relu2"}
_FEED_FORWARD = {"0": "norm", "1": "up_proj", "3": "down_proj"}
_GATES = {"alpha_attn": "attn_gate", "alpha_ffw": "ff_gate"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_flamingo_mini(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from a flamingo-mini folder (config.json + weights)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a flamingo-mini folder: it has no config.json")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ValueError(f"{str(folder)!r} has none of {WEIGHT_FILES}")
    return json.loads((folder / "config.json").read_text()), load_state_dict(weights)


def flaminko_config(mini: dict, text_config, vision_config, *, media_token_id, eoc_token_id) -> FlaminkoConfig:
    for name, act in (("xattn_act", mini.get("xattn_act", "gelu")), ("resampler_act", mini.get("resampler_act", "gelu"))):
        if act not in ACTIVATIONS:
            raise ValueError(f"flamingo-mini {name}={act!r} is unknown; known: {sorted(ACTIVATIONS)}")
    every = mini.get("xattn_every", 1)
    return FlaminkoConfig(
        vision_config=vision_config,
        text_config=text_config,
        cross_attn_every_n_layers=every,
        cross_attn_layers=[i for i in range(text_config.num_hidden_layers) if i % every == 0],
        cross_attn_heads=mini.get("xattn_heads", 8),
        cross_attn_dim_head=mini.get("xattn_dim_head", 64),
        cross_attn_ff_mult=mini.get("xattn_ff_mult", 4),
        cross_attn_ff_act=ACTIVATIONS[mini.get("xattn_act", "gelu")],
        vision_feature_include_cls=True,
        perceiver_depth=mini.get("resampler_depth", 6),
        perceiver_heads=mini.get("resampler_heads", 8),
        perceiver_dim_head=mini.get("resampler_dim_head", 64),
        perceiver_num_latents=mini.get("resampler_num_latents", 64),
        perceiver_ff_mult=mini.get("resampler_ff_mult", 4),
        perceiver_ff_act=ACTIVATIONS[mini.get("resampler_act", "gelu")],
        max_num_frames=mini.get("resampler_num_time_embeds", 4),
        only_attend_immediate_media=True,
        media_token_id=media_token_id,
        eoc_token_id=eoc_token_id,
    )


def map_flamingo_mini(state: dict[str, torch.Tensor], *, lm_prefix: str, layers_path: str):
    """({Flaminko name: tensor}, [keys with no place])."""
    mapped, unplaced = {}, []
    resampler_kv = {}
    for key, tensor in state.items():
        if key == "flamingo.resampler.latents" or key.startswith("flamingo.resampler.norm."):
            mapped[key.replace("flamingo.resampler.", "perceiver.")] = tensor
        elif key == "flamingo.resampler.time_pos_emb":
            mapped["perceiver.frame_embeddings"] = tensor.reshape(tensor.shape[0], tensor.shape[-1])
        elif match := re.fullmatch(r"flamingo\.resampler\.layers\.(\d+)\.0\.(to_k|to_v)\.weight", key):
            resampler_kv.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif match := re.fullmatch(r"flamingo\.resampler\.layers\.(\d+)\.0\.(.+)", key):
            mapped[f"perceiver.layers.{match.group(1)}.attention.{match.group(2)}"] = tensor
        elif match := re.fullmatch(r"flamingo\.resampler\.layers\.(\d+)\.1\.([013])\.(.+)", key):
            index, part, rest = match.groups()
            mapped[f"perceiver.layers.{index}.feed_forward.{_FEED_FORWARD[part]}.{rest}"] = tensor
        elif match := re.fullmatch(r"flamingo\.lm\..+\.(\d+)\.xattn_block\.(.+)", key):
            index, rest = match.groups()
            if rest in _GATES:
                rest = _GATES[rest]
            elif part := re.fullmatch(r"ffw\.([013])\.(.+)", rest):
                rest = f"ff.{_FEED_FORWARD[part.group(1)]}.{part.group(2)}"
            mapped[f"cross_attn_layers.{index}.{rest}"] = tensor
        elif match := re.fullmatch(r"flamingo\.lm\..+\.(\d+)\.lm_block\.(.+)", key):
            mapped[f"language_model.{lm_prefix}{layers_path}.{match.group(1)}.{match.group(2)}"] = tensor
        elif key.startswith("flamingo.lm."):
            mapped[f"language_model.{lm_prefix}{key[len('flamingo.lm.'):]}"] = tensor
        elif key == "flamingo.lm_head.weight":
            mapped["language_model.lm_head.weight"] = tensor
        elif key.startswith("flamingo.vision_encoder."):
            # transformers 4 nested CLIPVisionModel's weights under vision_model.; transformers 5 does not.
            name = key[len("flamingo.vision_encoder.") :].removeprefix("vision_model.")
            mapped[f"vision_model.{name}"] = tensor
        else:
            unplaced.append(key)
    for index, parts in resampler_kv.items():
        if set(parts) != {"to_k", "to_v"}:
            unplaced += [f"flamingo.resampler.layers.{index}.0.{name}.weight" for name in parts]
            continue
        # flamingo-mini projects keys and values separately; Flaminko's to_kv is both, keys first.
        mapped[f"perceiver.layers.{index}.attention.to_kv.weight"] = torch.cat([parts["to_k"], parts["to_v"]])
    return mapped, unplaced


def convert_flamingo_mini(folder, out, *, vision=None, language_model=None) -> ConversionSummary:
    """Convert a flamingo-mini folder to a Flaminko folder at `out`. The LM and CLIP configs and the
    tokenizer come from `language_model` / `vision` (default: the ids in its config); weights from
    the checkpoint, which holds the whole model."""
    mini, state = read_flamingo_mini(folder)
    language_model = language_model or mini.get("lm", "gpt2")
    vision = vision or mini.get("clip_model_type", "openai/clip-vit-base-patch32")
    text_config = AutoConfig.from_pretrained(language_model)
    if text_config.model_type not in ("gpt2", "opt"):
        raise ValueError(f"flamingo-mini models are GPT-2 or OPT; {language_model!r} is {text_config.model_type!r}")
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lm_head, input_embedding = state.get("flamingo.lm_head.weight"), _input_embedding(state)
    text_config.vocab_size = input_embedding.shape[0]
    # Older flamingo-mini versions kept a separate copy of the output layer.
    text_config.tie_word_embeddings = lm_head is None or torch.equal(lm_head, input_embedding)
    processor = FlaminkoProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": vision_config.image_size},
            crop_size={"height": vision_config.image_size, "width": vision_config.image_size},
        ),
        tokenizer=tokenizer,
        image_token="<image>",
        end_of_chunk_token="<EOC>",
        image_token_id=tokenizer("<image>", add_special_tokens=False)["input_ids"][0],
    )
    if len(tokenizer) != text_config.vocab_size:
        raise ValueError(
            f"The checkpoint's embedding has {text_config.vocab_size} rows but {language_model!r}'s tokenizer "
            f"with <EOC> has {len(tokenizer)} tokens: pass the tokenizer the model was trained with"
        )
    config = flaminko_config(
        mini,
        text_config,
        vision_config,
        media_token_id=processor.image_token_id,
        eoc_token_id=processor.end_of_chunk_token_id,
    )
    model = FlaminkoForConditionalGeneration(config)
    lm_prefix = f"{model.language_model.base_model_prefix}."
    layers_path = decoder_layers_path(model.language_model).removeprefix(lm_prefix)
    mapped, unplaced = map_flamingo_mini(state, lm_prefix=lm_prefix, layers_path=layers_path)
    if not any(name.startswith("vision_model.") for name in mapped):
        pretrained = CLIPVisionModel.from_pretrained(vision).state_dict()
        mapped.update({f"vision_model.{name}": tensor for name, tensor in pretrained.items()})
    expected = model.state_dict()
    unplaced += [name for name in mapped if name not in expected]
    misfits = [
        f"{name} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
        for name, tensor in mapped.items()
        if name in expected and tensor.shape != expected[name].shape
    ]
    # Tied parameters are listed once, so a tied output layer needs no key of its own.
    unfilled = [name for name, _ in model.named_parameters() if name not in mapped]
    if unplaced or misfits or unfilled:
        raise ValueError(
            "The flamingo-mini checkpoint does not fit.\n"
            + (f"Keys with no place: {sorted(unplaced)}\n" if unplaced else "")
            + (f"Shapes that do not fit: {misfits}\n" if misfits else "")
            + (f"Weights left unfilled: {unfilled}" if unfilled else "")
        )
    with torch.no_grad():
        for name, tensor in tqdm(mapped.items(), desc="mapping tensors", unit="tensor"):
            expected[name].copy_(tensor)
    summary = ConversionSummary(tensors_mapped=len(mapped))
    write_converted_folder(
        model, processor, out, base_models=[str(vision), str(language_model)], origin="flamingo-mini", summary=summary
    )
    return summary


def _input_embedding(state) -> torch.Tensor:
    for name in ("flamingo.lm.wte.weight", "flamingo.lm.decoder.embed_tokens.weight"):
        if name in state:
            return state[name]
    raise ValueError("The checkpoint has no token embedding (flamingo.lm.wte / flamingo.lm.decoder.embed_tokens)")
