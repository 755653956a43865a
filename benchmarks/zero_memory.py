"""Per-GPU memory for the model states (weights, gradients, Adam states) of the 3B, 4B and 9B Flamingo
shapes under DDP, FSDP2, ZeRO-2 and ZeRO-3, with and without LoRA, from DeepSpeed's own estimators and
the parameter counts of the real shapes (built on the meta device: nothing is downloaded or allocated).

DeepSpeed's estimators count every parameter as trained. Flaminko freezes the backbones, so the table
also gives the same per-parameter bytes applied to what trains: every parameter keeps its 16-bit copy
(2 bytes), and only a trained one has 16-bit and 32-bit gradients, a 32-bit master copy and Adam's two
moments (18 bytes, DeepSpeed's figure). Activation checkpointing changes the activations, not the model
states, so it does not change these figures.

    python benchmarks/zero_memory.py --out benchmarks/results/zero-memory.json
"""

import argparse
import json

import torch

GIB = 2**30
# The language models of the OpenFlamingo releases (their Hub configs), the CLIP ViT-L/14 tower of the defaults.
SHAPES = {
    "3B": ("mpt", dict(d_model=2048, n_heads=16, n_layers=24, expansion_ratio=4, max_seq_len=2048, vocab_size=50432), 1),
    "4B": (
        "gpt_neox",
        dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240, rotary_pct=1.0, vocab_size=50432),
        2,
    ),
    "9B": ("mpt", dict(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432), 4),
}
# GPUs, GiB each.
SETUPS = {"1x24GB": (1, 24), "1x80GB": (1, 80), "8x80GB": (8, 80)}


def build(shape: str, lora: bool):
    from transformers import AutoConfig

    from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration
    from flaminko.configuration_flaminko import DEFAULT_VISION_CONFIG
    from flaminko.training import lora_config

    family, text, every = SHAPES[shape]
    vocab = text["vocab_size"]
    config = FlaminkoConfig(
        vision_config=dict(DEFAULT_VISION_CONFIG),
        text_config=AutoConfig.for_model(family, **text).to_dict(),
        cross_attn_every_n_layers=every,
        media_token_id=vocab - 1,
        eoc_token_id=vocab - 2,
    )
    with torch.device("meta"):
        model = FlaminkoForConditionalGeneration(config)
        if lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(model))
    return model


def counts(model) -> dict:
    from deepspeed.runtime.zero.stage3 import model_to_params

    # DeepSpeed's own count of the largest layer; its total tells shared parameters apart by data_ptr,
    # which is 0 for every tensor on the meta device, so the total is counted here (model.parameters()
    # already yields a shared parameter once).
    largest_layer = model_to_params(model)[1]
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trained": trained, "largest_layer": largest_layer}


def per_gpu_bytes(sizes: dict, gpus: int) -> dict:
    """{strategy: (DeepSpeed's estimate, every parameter trained), (what trains here)} in bytes."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, trained, largest = sizes["parameters"], sizes["trained"], sizes["largest_layer"]
    frozen_16bit = 2 * total

    def zero2(gpu_count):
        estimate = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpu_count, cpu_offload=False)[1]
        return estimate, frozen_16bit + 18 * trained // gpu_count

    def zero3(gpu_count):
        estimate = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpu_count, cpu_offload=False)[1]
        return estimate, 4 * largest + (frozen_16bit + 16 * trained) // gpu_count

    # DDP shards nothing: ZeRO-2's figure on one GPU. FSDP2 (full shard) shards what ZeRO-3 does.
    return {"DDP": zero2(1), "ZeRO-2": zero2(gpus), "ZeRO-3": zero3(gpus), "FSDP2": zero3(gpus)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        for lora in (False, True):
            sizes = counts(build(shape, lora))
            for setup, (gpus, memory) in SETUPS.items():
                for strategy, (estimate, here) in per_gpu_bytes(sizes, gpus).items():
                    rows.append(
                        {"shape": shape, "lora": lora, "setup": setup, "strategy": strategy, **sizes,
                         "deepspeed_estimate_gib": round(estimate / GIB, 1), "trained_here_gib": round(here / GIB, 1),
                         # The model states alone, before activations and buffers.
                         "states_fit": here < memory * GIB}
                    )
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
