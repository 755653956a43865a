"""Flaminko on a GPU at the full OpenFlaminKO shape in bf16: attention implementations compared, and
batch-1 decoding against the memory-bandwidth bound.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json            # on an H100/H200/A100
    python benchmarks/gpu.py --device cpu --dtype float32 --layers 1 --width-divisor 8   # CPU check of the script

For each of eager, sdpa and flash_attention_2 (the last when flash-attn is installed; the
cross-attention then runs on SDPA, its per-token media mask not being a padding mask):
decode tokens/s at batch 1 and 8 (one image, 128 new tokens, greedy), a training step (batch 8,
one image, 64 tokens, forward + backward with the backbones frozen) and peak memory. The bound:
every decoded token reads the LM and cross-attention weights (of the input embedding, one row) and
the cached media keys/values once, so tokens/s <= bandwidth / those bytes; the device bandwidth is
measured with a large copy.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPVisionConfig, LogitsProcessor, LogitsProcessorList

from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration
from flaminko.configuration_flaminko import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG


class StepClock(LogitsProcessor):
    """Records when each decoding step's logits are ready: steps 2..n time the decoding alone."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores

    def rate(self, sequences):
        return sequences * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device, gigabytes: float) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    source = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * 5 / (time.perf_counter() - start)


def build(layers, divisor, dtype, device, attention):
    vision = {k: v for k, v in DEFAULT_VISION_CONFIG.items() if k != "model_type"}
    text = {k: v for k, v in DEFAULT_TEXT_CONFIG.items() if k != "model_type"}
    for settings, heads in ((vision, "num_attention_heads"), (text, "num_attention_heads")):
        settings["hidden_size"] //= divisor
        settings["intermediate_size"] //= divisor
        settings[heads] = max(1, settings[heads] // divisor)
        if layers:
            settings["num_hidden_layers"] = layers
    config = FlaminkoConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=AutoConfig.for_model("gpt_neox", **text),
        media_token_id=text["vocab_size"] - 2,
        eoc_token_id=text["vocab_size"] - 3,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = FlaminkoForConditionalGeneration(config).to(dtype)
    with torch.no_grad():
        for block in model.cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model.eval()


def inputs(model, batch, tokens, device, dtype):
    config = model.config
    input_ids = torch.randint(0, config.text_config.vocab_size - 3, (batch, tokens), device=device)
    input_ids[:, 0] = config.media_token_id
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 1, 3, size, size, device=device, dtype=dtype)
    return input_ids, torch.ones_like(input_ids), pixel_values


def decode_rate(model, batch, device, dtype, new_tokens):
    input_ids, attention_mask, pixel_values = inputs(model, batch, 32, device, dtype)
    clock = StepClock(device)
    with torch.no_grad():
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, logits_processor=LogitsProcessorList([clock]),
        )
    return clock.rate(batch)


def training_step(model, device, dtype, repeats=5):
    input_ids, attention_mask, pixel_values = inputs(model, 8, 64, device, dtype)
    model.train()
    times = []
    for index in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=input_ids).loss.backward()
        synchronize(device)
        if index:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    model.eval()
    return sorted(times)[len(times) // 2]


def decode_matrices(model):
    """The weights one decoded token reads whole: the LM's and the cross-attention blocks'. The
    input embedding is left out (a token reads one row of it) unless the output layer shares it."""
    input_embedding = model.get_input_embeddings().weight
    tied = input_embedding is model.get_output_embeddings().weight
    return [
        parameter for name, parameter in model.named_parameters()
        if name.startswith(("language_model.", "cross_attn_layers.")) and (tied or parameter is not input_embedding)
    ]


def bytes_read_per_token(model):
    """The decode weights, and the media keys/values of one image in every block."""
    weights = sum(p.numel() * p.element_size() for p in decode_matrices(model))
    config = model.config
    kv = 2 * config.perceiver_num_latents * config.cross_attn_heads * config.cross_attn_dim_head
    return weights + kv * len(model.cross_attn_layers) * next(model.parameters()).element_size()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, help="fewer layers than the 24 of the shape")
    parser.add_argument("--width-divisor", type=int, default=1, help="narrower model, for checking the script on a CPU")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    implementations = ["eager", "sdpa"]
    try:
        import flash_attn  # noqa: F401

        implementations.append("flash_attention_2")
    except ImportError:
        print("flash-attn is not installed: flash_attention_2 left out")
    measured_bandwidth = bandwidth(device, 4 if device.type == "cuda" else 0.25)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
               "bandwidth_bytes_per_s": measured_bandwidth, "runs": []}
    for attention in implementations:
        model = build(args.layers, args.width_divisor, dtype, device, attention)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run = {
            "attention": attention,
            "decode_tokens_per_s_batch1": decode_rate(model, 1, device, dtype, args.new_tokens),
            "decode_tokens_per_s_batch8": decode_rate(model, 8, device, dtype, args.new_tokens),
            "train_step_s": training_step(model, device, dtype),
        }
        run["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        bound = measured_bandwidth / bytes_read_per_token(model)
        run["batch1_bound_tokens_per_s"] = bound
        run["batch1_fraction_of_bound"] = run["decode_tokens_per_s_batch1"] / bound
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        del model
    eager = next(r for r in results["runs"] if r["attention"] == "eager")
    lines = [f"{results['device']}, {args.dtype}, measured bandwidth {measured_bandwidth / 1e9:.0f} GB/s", "",
             "| attention | decode tok/s b1 | decode tok/s b8 | train step (s) | train speed-up vs eager | peak memory | b1 / bound |",
             "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        memory = f"{run['peak_memory_bytes'] / 2**30:.1f} GiB" if run["peak_memory_bytes"] else "n/a"
        lines.append(
            f"| {run['attention']} | {run['decode_tokens_per_s_batch1']:.1f} | {run['decode_tokens_per_s_batch8']:.1f} | "
            f"{run['train_step_s']:.3f} | {eager['train_step_s'] / run['train_step_s']:.2f}x | {memory} | "
            f"{run['batch1_fraction_of_bound']:.0%} |"
        )
    results["markdown"] = "\n".join(lines)
    print(results["markdown"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
