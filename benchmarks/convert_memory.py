"""Peak memory of `flaminko convert open-flamingo` at the OpenFlaminKO shape (CLIP ViT-L/14 +
Polyglot-Ko-1.3B widths, a block before every layer), against the bytes of the converted weights.

    python benchmarks/convert_memory.py --work /tmp/convert-bench [--layers 24]

Builds random backbones of those shapes (nothing is downloaded), writes a flat OpenFlamingo
checkpoint.pt with the documented keys, then runs the conversion in a fresh process and reads its
peak resident memory. Prints a markdown table and writes results.json.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def build_inputs(work: Path, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from flaminko import tiny
    from flaminko.configuration_flaminko import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG

    vision_config = CLIPVisionConfig(**{k: v for k, v in DEFAULT_VISION_CONFIG.items() if k != "model_type"})
    vision = CLIPVisionModel(vision_config)
    vision.save_pretrained(work / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(work / "vision")
    del vision
    text = {k: v for k, v in DEFAULT_TEXT_CONFIG.items() if k != "model_type"}
    text["num_hidden_layers"] = layers
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_neox", **text))
    lm.save_pretrained(work / "lm")
    tiny.train_tokenizer(tiny.shipped_text()).save_pretrained(work / "lm")
    hidden = lm.config.hidden_size
    state = {"lang_encoder.gpt_neox.embed_in.weight": lm.gpt_neox.embed_in.weight.detach().clone(),
             "lang_encoder.embed_out.weight": lm.lm_head.weight.detach().clone()}
    del lm
    dim, inner = 1024, 512
    for i in range(6):
        p = f"perceiver.layers.{i}"
        state.update({
            f"{p}.0.norm_media.weight": torch.ones(dim), f"{p}.0.norm_media.bias": torch.zeros(dim),
            f"{p}.0.norm_latents.weight": torch.ones(dim), f"{p}.0.norm_latents.bias": torch.zeros(dim),
            f"{p}.0.to_q.weight": torch.randn(inner, dim) * 0.02, f"{p}.0.to_kv.weight": torch.randn(2 * inner, dim) * 0.02,
            f"{p}.0.to_out.weight": torch.randn(dim, inner) * 0.02, f"{p}.1.0.weight": torch.ones(dim),
            f"{p}.1.0.bias": torch.zeros(dim), f"{p}.1.1.weight": torch.randn(4 * dim, dim) * 0.02,
            f"{p}.1.3.weight": torch.randn(dim, 4 * dim) * 0.02,
        })
    state.update({"perceiver.latents": torch.randn(64, dim), "perceiver.norm.weight": torch.ones(dim), "perceiver.norm.bias": torch.zeros(dim)})
    for i in range(layers):
        p = f"lang_encoder.gpt_neox.layers.{i}.gated_cross_attn_layer"
        state.update({
            f"{p}.attn_gate": torch.tensor([0.1]), f"{p}.ff_gate": torch.tensor([0.1]),
            f"{p}.attn.norm.weight": torch.ones(hidden), f"{p}.attn.norm.bias": torch.zeros(hidden),
            f"{p}.attn.to_q.weight": torch.randn(inner, hidden) * 0.02, f"{p}.attn.to_kv.weight": torch.randn(2 * inner, dim) * 0.02,
            f"{p}.attn.to_out.weight": torch.randn(hidden, inner) * 0.02, f"{p}.ff.0.weight": torch.ones(hidden),
            f"{p}.ff.0.bias": torch.zeros(hidden), f"{p}.ff.1.weight": torch.randn(4 * hidden, hidden) * 0.02,
            f"{p}.ff.3.weight": torch.randn(hidden, 4 * hidden) * 0.02,
        })
    torch.save(state, work / "checkpoint.pt")
    return sum(t.numel() for t in state.values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/convert-bench")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        from flaminko.conversion import convert_open_flamingo

        start = time.perf_counter()
        summary = convert_open_flamingo(work / "checkpoint.pt", work / "vision", work / "lm", work / "out")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak, "parameters": summary.parameters,
                          "bytes_written": summary.bytes_written, "tensors": summary.tensors_mapped}))
        return
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "checkpoint.pt").exists():
        checkpoint_parameters = build_inputs(work, args.layers)
        print(f"inputs built: checkpoint with {checkpoint_parameters:,} parameters")
    result = subprocess.run([sys.executable, __file__, "--work", str(work), "--child"], capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    weight_bytes = measured["parameters"] * 4
    measured["weight_bytes_fp32"] = weight_bytes
    measured["peak_over_weights"] = measured["peak_rss"] / weight_bytes
    measured["layers"] = args.layers
    (work / "results.json").write_text(json.dumps(measured, indent=2))
    print("| layers | parameters | fp32 weight bytes | peak RSS | peak / weights | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.layers} | {measured['parameters']:,} | {weight_bytes / 2**30:.2f} GiB | "
          f"{measured['peak_rss'] / 2**30:.2f} GiB | {measured['peak_over_weights']:.2f}x | {measured['seconds']:.0f} |")


if __name__ == "__main__":
    main()
