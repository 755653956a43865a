"""Flaminko on a GPU at the full OpenFlaminKO shape in bf16: attention implementations and caches
compared, batch-1 decoding against the memory-bandwidth bound, and which attention kernels run.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json            # on an H100/H200/A100
    python benchmarks/gpu.py --device cpu --dtype float32 --layers 1 --width-divisor 8   # CPU check of the script

Rows: eager and sdpa (and flash_attention_2 when flash-attn is installed; the cross-attention then
runs on SDPA, its per-token media mask not being a padding mask) x three ways to decode:
`dynamic` (DynamicCache), `static` (StaticCache, compile disabled) and `compiled` (StaticCache and
transformers' automatic compile of the decoding step with its default CompileConfig: inductor,
reduce-overhead = CUDA graphs). For each: decode tokens/s at batch 1 and 8 (one image, greedy,
--new-tokens new tokens), time to first token at batch 1 (one image: encode + resample + project +
prefill, from the call to the first logits), peak memory of the batch-8 decode, and batch-1
decoding as a fraction of the bandwidth bound: every decoded token reads the LM and cross-attention
weights (of the input embedding, one row) and the cached media keys/values once, so tokens/s <=
bandwidth / those bytes, the bandwidth being measured with a large copy. A training step (batch 8,
one image, 64 tokens, forward + backward, backbones frozen) per attention implementation.

Every variant is warmed up first (a full untimed run of each measured shape: compile and CUDA-graph
capture happen there), then the variants alternate within each of --repeats rounds and the medians
are reported. Each timed sample is wrapped in benchmarks/machine.py's OtherLoad, whose figure (CPU
time other processes used meanwhile) stands beside it; NOISY marks a loaded machine. Then, under
sdpa, torch.profiler lists the attention kernels of the LM's self-attention and of the gated
cross-attention (one image: no media mask; two images: a boolean mask): flash, memory-efficient,
cuDNN or the unfused math path. On a CPU, `compiled` captures the step with dynamo's eager
backend unless --compile-backend says otherwise (inductor's CPU code generation takes minutes).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, CLIPVisionConfig, CompileConfig, LogitsProcessor, LogitsProcessorList

from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration
from flaminko.configuration_flaminko import CACHE_NAME, DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG
from flaminko.modeling_flaminko import media_attention_mask
from machine import OtherLoad

CACHES = ("dynamic", "static", "compiled")
BATCHES = (1, 8)
# Substrings of kernel names (lower case) that tell which attention path ran.
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "cudnn", "efficient", "softmax")


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


def generation_kwargs(cache, device, compile_backend):
    if cache == "dynamic":
        return {}
    if cache == "static":
        # On a GPU transformers would compile a static cache's step by itself: this row is without.
        return {"cache_implementation": "static", "disable_compile": True}
    backend = compile_backend or ("inductor" if device.type == "cuda" else "eager")
    # transformers' default mode, reduce-overhead (CUDA graphs), where there are CUDA graphs to capture.
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None
    config = CompileConfig(backend=backend, mode=mode)
    # transformers compiles automatically only on accelerators; on a CPU it has to be told.
    config._compile_all_devices = device.type != "cuda" or None
    return {"cache_implementation": "static", "compile_config": config}


def decode(model, batch, device, dtype, new_tokens, cache, compile_backend):
    """(decode tokens/s, seconds from the call to the first logits, peak bytes or None)."""
    input_ids, attention_mask, pixel_values = inputs(model, batch, 32, device, dtype)
    clock = StepClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, logits_processor=LogitsProcessorList([clock]),
            **generation_kwargs(cache, device, compile_backend),
        )
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return clock.rate(batch), clock.times[0] - start, peak


def training_step(model, device, dtype):
    """(seconds, peak bytes or None) of one forward + backward."""
    input_ids, attention_mask, pixel_values = inputs(model, 8, 64, device, dtype)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=input_ids).loss.backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def attention_kernels(model, device, dtype):
    """Names of the attention kernels (device kernels on a GPU, operators on a CPU) that run in the
    LM's self-attention (a prefill, and a decoding step under a static cache, as the compiled path
    runs it) and in one gated cross-attention (one image: no mask; two images: boolean mask)."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU

    def names(run):
        with torch.no_grad():
            run()
            synchronize(device)
            with profile(activities=[activity]) as prof:
                run()
                synchronize(device)
        events = [e for e in prof.events() if e.device_type.name == activity.name]
        counts = {}
        for event in events:
            if any(word in event.name.lower() for word in ATTENTION_KERNEL_WORDS):
                counts[event.name] = counts.get(event.name, 0) + 1
        return counts

    input_ids, attention_mask, _ = inputs(model, 1, 32, device, dtype)
    language_model = model.language_model
    result = {"self_attention_prefill": names(lambda: language_model(input_ids=input_ids, attention_mask=attention_mask))}

    def static_step():
        from transformers import StaticCache

        cache = StaticCache(config=language_model.config, max_cache_len=64)
        language_model(input_ids=input_ids, attention_mask=attention_mask, **{CACHE_NAME: cache})
        step_mask = torch.ones(1, 33, dtype=attention_mask.dtype, device=device)
        language_model(input_ids=input_ids[:, :1], attention_mask=step_mask, **{CACHE_NAME: cache})

    result["self_attention_prefill_and_static_step"] = names(static_step)
    block = next(iter(model.cross_attn_layers.values())).attn
    config = model.config
    hidden = torch.randn(1, 1, config.text_config.hidden_size, device=device, dtype=dtype)
    for images in (1, 2):
        latents = images * config.perceiver_num_latents
        key, value = torch.randn(2, 1, config.cross_attn_heads, latents, config.cross_attn_dim_head, device=device, dtype=dtype)
        positions = torch.full((1, 1), images, device=device)
        mask, has_media = media_attention_mask(positions, images, config.perceiver_num_latents, True)
        mask = None if images == 1 else mask
        result[f"cross_attention_step_{images}_image{'s' if images > 1 else ''}"] = names(
            lambda: block(hidden, key, value, mask, has_media)
        )
    return result


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


def median_row(samples):
    """Medians of the samples' figures, with the others' load beside each timing."""
    row = {}
    for name in samples[0]:
        values = [sample[name] for sample in samples if sample[name] is not None]
        row[name] = statistics.median(values) if values and not isinstance(values[0], str) else None
    return row


def measure(load_samples, key, function):
    with OtherLoad() as load:
        result = function()
    load_samples.setdefault(key, []).append({"other_cpu_seconds": load.other_cpu_seconds, "other_cores": load.other_cores, "noisy": load.noisy, "describe": load.describe()})
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, help="fewer layers than the 24 of the shape")
    parser.add_argument("--width-divisor", type=int, default=1, help="narrower model, for checking the script on a CPU")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-backend", help="torch.compile backend of the compiled rows (default: inductor on CUDA, eager elsewhere)")
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
               "torch": torch.__version__, "repeats": args.repeats, "new_tokens": args.new_tokens,
               "bandwidth_bytes_per_s": measured_bandwidth, "runs": [], "training": []}
    models = {attention: build(args.layers, args.width_divisor, dtype, device, attention) for attention in implementations}
    variants = [(attention, cache) for attention in implementations for cache in CACHES]
    for attention, cache in variants:  # warm-up: lazy initialisation, compilation, CUDA-graph capture
        start = time.perf_counter()
        for batch in BATCHES:
            decode(models[attention], batch, device, dtype, args.new_tokens, cache, args.compile_backend)
        print(f"warm-up {attention}/{cache}: {time.perf_counter() - start:.1f} s", flush=True)
    for attention in implementations:
        training_step(models[attention], device, dtype)
    samples = {variant: [] for variant in variants}
    training_samples = {attention: [] for attention in implementations}
    loads = {}
    for round_index in range(args.repeats):  # alternating: every variant once per round
        for attention, cache in variants:
            sample = {}
            for batch in BATCHES:
                rate, first, peak = measure(loads, f"{attention}/{cache}/b{batch}", lambda: decode(
                    models[attention], batch, device, dtype, args.new_tokens, cache, args.compile_backend))
                sample[f"decode_tokens_per_s_batch{batch}"] = rate
                if batch == 1:
                    sample["time_to_first_token_s"] = first
                else:
                    sample["decode_batch8_peak_memory_bytes"] = peak
            samples[(attention, cache)].append(sample)
            print(f"round {round_index + 1} {attention}/{cache}: {json.dumps({k: round(v, 4) if v else v for k, v in sample.items()})} "
                  f"[{loads[f'{attention}/{cache}/b1'][-1]['describe']}; {loads[f'{attention}/{cache}/b8'][-1]['describe']}]", flush=True)
        for attention in implementations:
            seconds, peak = measure(loads, f"{attention}/train", lambda: training_step(models[attention], device, dtype))
            training_samples[attention].append({"train_step_s": seconds, "train_peak_memory_bytes": peak})
    bound = measured_bandwidth / bytes_read_per_token(models["eager"])
    results["batch1_bound_tokens_per_s"] = bound
    for attention, cache in variants:
        run = {"attention": attention, "cache": cache, **median_row(samples[(attention, cache)])}
        run["batch1_fraction_of_bound"] = run["decode_tokens_per_s_batch1"] / bound
        run["batch8_over_batch1"] = run["decode_tokens_per_s_batch8"] / run["decode_tokens_per_s_batch1"]
        run["load"] = {f"b{batch}": loads[f"{attention}/{cache}/b{batch}"] for batch in BATCHES}
        results["runs"].append(run)
    for attention in implementations:
        results["training"].append({"attention": attention, **median_row(training_samples[attention]), "load": loads[f"{attention}/train"]})
    results["attention_kernels_sdpa"] = attention_kernels(models["sdpa"], device, dtype)

    def load_note(samples_of_figure):
        worst = max(samples_of_figure, key=lambda sample: sample["other_cores"])
        noisy = sum(sample["noisy"] for sample in samples_of_figure)
        return f"worst: {worst['describe']}" + (f"; {noisy}/{len(samples_of_figure)} noisy" if noisy else "")

    gib = lambda value: f"{value / 2**30:.1f} GiB" if value else "n/a"  # noqa: E731
    lines = [f"{results['device']}, {args.dtype}, measured bandwidth {measured_bandwidth / 1e9:.0f} GB/s, batch-1 bound "
             f"{bound:.0f} tok/s; median of {args.repeats}, {args.new_tokens} new tokens", "",
             "| attention | cache | decode tok/s b1 | decode tok/s b8 | b8 / b1 | first token (ms) | peak memory b8 | b1 / bound | others' load (b1; b8) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(
            f"| {run['attention']} | {run['cache']} | {run['decode_tokens_per_s_batch1']:.1f} | {run['decode_tokens_per_s_batch8']:.1f} | "
            f"{run['batch8_over_batch1']:.1f}x | {run['time_to_first_token_s'] * 1e3:.1f} | {gib(run['decode_batch8_peak_memory_bytes'])} | "
            f"{run['batch1_fraction_of_bound']:.0%} | {load_note(run['load']['b1'])}; {load_note(run['load']['b8'])} |"
        )
    lines += ["", "| attention | train step (s) | peak memory | others' load |", "|---|---|---|---|"]
    for run in results["training"]:
        lines.append(f"| {run['attention']} | {run['train_step_s']:.3f} | {gib(run['train_peak_memory_bytes'])} | {load_note(run['load'])} |")
    lines += ["", "Attention kernels under sdpa (name: calls):"]
    for part, kernels in results["attention_kernels_sdpa"].items():
        lines.append(f"- {part}: " + (", ".join(f"`{name}`: {count}" for name, count in kernels.items()) or "none matched"))
    results["markdown"] = "\n".join(lines)
    print(results["markdown"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
