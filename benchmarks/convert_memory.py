"""Peak memory of `flaminko convert open-flamingo`, against the bytes of the converted weights.

    python benchmarks/convert_memory.py --shape 9b --layers 32 --dtype bfloat16 --work /tmp/convert-9b
    python benchmarks/convert_memory.py --shape openflaminko --layers 24 --work /tmp/convert-ko

Shapes: `openflaminko` = CLIP ViT-L/14 + Polyglot-Ko-1.3B widths (GPT-NeoX), a block before every
layer; `9b` = CLIP ViT-L/14 + MPT-7B widths (MPT, 4096 wide, vocabulary 50432, the LM stored in
bfloat16 as mpt-7b is), a block before every 4th layer, as OpenFlamingo-9B. `--layers` scales the
LM's depth (full: 24 and 32) so that a machine smaller than the full conversion needs can measure
two depths and extrapolate: the peak grows linearly with the layers. The full 9B shape needs about
16 GB of memory to build its inputs and 35 GB of disk.

Builds random backbones of those shapes (nothing is downloaded), a tokenizer as long as the
checkpoint's embedding, and a flat OpenFlamingo checkpoint.pt with the documented keys, then runs
the conversion in a fresh process and reads its peak resident memory. Prints a markdown row and
writes results.json.
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from machine import setup

VISION_WIDTH, INNER = 1024, 512
ADDED_TOKENS = 3  # <|endofchunk|>, <image>, <PAD>
SHAPES = {
    "openflaminko": {"family": "gpt_neox", "every_n": 1, "tokens": 30080 - ADDED_TOKENS, "lm_dtype": torch.float32},
    "9b": {"family": "mpt", "every_n": 4, "tokens": 50277, "lm_dtype": torch.bfloat16},
}


def word_level_tokenizer(size: int):
    """A tokenizer of exactly `size` tokens (id 0 = <|endoftext|>), as long as the real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def text_config(shape: str, layers: int):
    from transformers import AutoConfig, MptConfig

    from flaminko.configuration_flaminko import DEFAULT_TEXT_CONFIG

    if shape == "9b":
        return MptConfig(d_model=4096, n_heads=32, n_layers=layers, expansion_ratio=4, max_seq_len=2048, vocab_size=50432)
    text = {k: v for k, v in DEFAULT_TEXT_CONFIG.items() if k != "model_type"}
    return AutoConfig.for_model("gpt_neox", **{**text, "num_hidden_layers": layers})


def random_block(prefix: str, hidden: int) -> dict:
    """One gated cross-attention block as OpenFlamingo saves it."""
    return {
        f"{prefix}.attn_gate": torch.tensor([0.1]), f"{prefix}.ff_gate": torch.tensor([0.1]),
        f"{prefix}.attn.norm.weight": torch.ones(hidden), f"{prefix}.attn.norm.bias": torch.zeros(hidden),
        f"{prefix}.attn.to_q.weight": torch.randn(INNER, hidden) * 0.02,
        f"{prefix}.attn.to_kv.weight": torch.randn(2 * INNER, VISION_WIDTH) * 0.02,
        f"{prefix}.attn.to_out.weight": torch.randn(hidden, INNER) * 0.02,
        f"{prefix}.ff.0.weight": torch.ones(hidden), f"{prefix}.ff.0.bias": torch.zeros(hidden),
        f"{prefix}.ff.1.weight": torch.randn(4 * hidden, hidden) * 0.02,
        f"{prefix}.ff.3.weight": torch.randn(hidden, 4 * hidden) * 0.02,
    }


def random_perceiver() -> dict:
    dim = VISION_WIDTH
    state = {"perceiver.latents": torch.randn(64, dim), "perceiver.norm.weight": torch.ones(dim), "perceiver.norm.bias": torch.zeros(dim)}
    for i in range(6):
        p = f"perceiver.layers.{i}"
        state.update({
            f"{p}.0.norm_media.weight": torch.ones(dim), f"{p}.0.norm_media.bias": torch.zeros(dim),
            f"{p}.0.norm_latents.weight": torch.ones(dim), f"{p}.0.norm_latents.bias": torch.zeros(dim),
            f"{p}.0.to_q.weight": torch.randn(INNER, dim) * 0.02, f"{p}.0.to_kv.weight": torch.randn(2 * INNER, dim) * 0.02,
            f"{p}.0.to_out.weight": torch.randn(dim, INNER) * 0.02, f"{p}.1.0.weight": torch.ones(dim),
            f"{p}.1.0.bias": torch.zeros(dim), f"{p}.1.1.weight": torch.randn(4 * dim, dim) * 0.02,
            f"{p}.1.3.weight": torch.randn(dim, 4 * dim) * 0.02,
        })
    return state


def build_inputs(work: Path, shape: str, layers: int) -> int:
    from transformers import AutoModelForCausalLM, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from flaminko.configuration_flaminko import DEFAULT_VISION_CONFIG

    settings = SHAPES[shape]
    vision = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in DEFAULT_VISION_CONFIG.items() if k != "model_type"}))
    vision.save_pretrained(work / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(work / "vision")
    del vision
    lm = AutoModelForCausalLM.from_config(text_config(shape, layers), dtype=settings["lm_dtype"])
    lm.save_pretrained(work / "lm", max_shard_size="5GB")
    word_level_tokenizer(settings["tokens"]).save_pretrained(work / "lm")
    rows = settings["tokens"] + ADDED_TOKENS
    embedding = lm.get_input_embeddings().weight.detach()[:rows].float().clone()
    hidden = embedding.shape[1]
    if settings["family"] == "mpt":
        state = {"lang_encoder.transformer.wte.weight": embedding}
        layers_path = "lang_encoder.transformer.blocks"
    else:
        state = {"lang_encoder.gpt_neox.embed_in.weight": embedding, "lang_encoder.embed_out.weight": lm.lm_head.weight.detach()[:rows].float().clone()}
        layers_path = "lang_encoder.gpt_neox.layers"
    del lm
    state.update(random_perceiver())
    for i in range(layers):
        if (i + 1) % settings["every_n"] == 0:
            state.update(random_block(f"{layers_path}.{i}.gated_cross_attn_layer", hidden))
    torch.save(state, work / "checkpoint.pt")
    return sum(t.numel() for t in state.values())


class AnonymousMemoryPeak(threading.Thread):
    """The largest RssAnon of this process, sampled every 20 ms: the memory that cannot be dropped,
    unlike the memory-mapped checkpoint and LM pages (file-backed, clean), which peak RSS also counts."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0

    def run(self):
        while True:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/convert-bench")
    parser.add_argument("--shape", choices=SHAPES, default="openflaminko")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        from flaminko.conversion import convert_open_flamingo

        anonymous = AnonymousMemoryPeak()
        anonymous.start()
        start = time.perf_counter()
        summary = convert_open_flamingo(
            work / "checkpoint.pt", str(work / "vision"), str(work / "lm"), work / "out",
            cross_attn_every_n_layers=SHAPES[args.shape]["every_n"], dtype=args.dtype,
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak, "peak_anonymous": anonymous.peak,
                          "parameters": summary.parameters,
                          "bytes_written": summary.bytes_written, "tensors": summary.tensors_mapped}))
        return
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "checkpoint.pt").exists():
        checkpoint_parameters = build_inputs(work, args.shape, args.layers)
        print(f"inputs built: checkpoint with {checkpoint_parameters:,} parameters")
    child = [sys.executable, __file__, "--work", str(work), "--shape", args.shape, "--dtype", args.dtype, "--child"]
    result = subprocess.run(child, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    weight_bytes = measured["parameters"] * torch.finfo(getattr(torch, args.dtype)).bits // 8
    measured.update(shape=args.shape, layers=args.layers, dtype=args.dtype, weight_bytes=weight_bytes, measured_on=setup())
    measured["peak_over_weights"] = measured["peak_rss"] / weight_bytes
    (work / "results.json").write_text(json.dumps(measured, indent=2))
    print("| shape | layers | dtype | parameters | weight bytes | peak RSS | peak / weights | peak anonymous |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} | {args.layers} | {args.dtype} | {measured['parameters']:,} | {weight_bytes / 2**30:.2f} GiB | "
          f"{measured['peak_rss'] / 2**30:.2f} GiB | {measured['peak_over_weights']:.2f}x | "
          f"{measured['peak_anonymous'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
