"""Flaminko against OpenFlamingo's own code, on identical weights, side by side.

    python benchmarks/compare.py --shape small --repeats 2 --out benchmarks/results/small.json
    python benchmarks/compare.py --shape openflaminko --layers 2 --repeats 3 --out benchmarks/results/openflaminko-2-layers.json

Builds random backbones of the shape (nothing is downloaded), builds OpenFlamingo around them with
its gates open, converts its checkpoint to Flaminko, and then times, alternating between the two and
taking medians: generate (batch 1 and 8, 1 and 4 images per prompt, 32 new tokens, greedy and beam
3), the decode rate inside it, a training step (forward + backward, frozen backbones) and peak
memory. Checks that both give the same greedy tokens. Prints a markdown table and writes JSON.
Every timed sample records the CPU time other processes used meanwhile (benchmarks/machine.py's
OtherLoad): medians leave out noisy samples where quiet ones exist, and the table says how many
samples were noisy. Run it on a quiet machine: the figures are only as good as that.
Needs the oracle: pip install --no-deps open-flamingo==2.0.1 einops einops-exts.
"""

import argparse
import ctypes
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LogitsProcessorList

from flaminko import FlaminkoForConditionalGeneration, tiny
from flaminko.conversion import convert_open_flamingo
from flaminko.conversion.reference import build_open_flamingo
from gpu import StepClock, bytes_read_per_token, decode_matrices
from machine import OtherLoad, describe_setup, setup

SHAPES = {
    # ViT-B/16-like vision + 12-layer 768-wide GPT-NeoX.
    "small": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, rotary_pct=0.25),
    },
    # CLIP ViT-L/14 + Polyglot-Ko-1.3B widths.
    "openflaminko": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224),
        "text": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16, rotary_pct=0.5),
    },
}
NEW_TOKENS = 32


def build(shape: str, layers: int | None, folder: Path, seed: int = 0):
    """(OpenFlamingo model, its tokenizer, Flaminko model) with the same weights."""
    torch.manual_seed(seed)
    spec = SHAPES[shape]
    vision_overrides, text_overrides = dict(spec["vision"]), dict(spec["text"])
    if layers:
        vision_overrides["num_hidden_layers"] = text_overrides["num_hidden_layers"] = layers
    vision = tiny.save_tiny_vision(folder / "vision", **vision_overrides)
    language = tiny.save_tiny_language_model(folder / "lm", "gpt_neox", vocab_size=2000, **text_overrides)
    reference, tokenizer = build_open_flamingo(vision, language, 1)
    with torch.no_grad():
        for block in reference.lang_encoder.gated_cross_attn_layers:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    # The whole state dict (the LM's output layer included), so no weight differs between the two.
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("vision_encoder.")}
    torch.save(state, folder / "checkpoint.pt")
    convert_open_flamingo(folder / "checkpoint.pt", vision, language, folder / "flaminko")
    ours = FlaminkoForConditionalGeneration.from_pretrained(folder / "flaminko").eval()
    return reference.eval(), tokenizer, ours


def inputs(tokenizer, batch: int, images: int, image_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = "".join("<image>사진 설명입니다<|endofchunk|>" for _ in range(images - 1)) + "<image>사진:"
    encoded = tokenizer([text] * batch, return_tensors="pt", padding=True)
    # One left pad per prompt: under transformers 5, generate drops an all-ones attention mask, and
    # OpenFlamingo's forward then fails for want of one.
    pad = torch.full((batch, 1), tokenizer.pad_token_id)
    input_ids = torch.cat([pad, encoded["input_ids"]], dim=1)
    attention_mask = torch.cat([torch.zeros_like(pad), encoded["attention_mask"]], dim=1)
    vision_x = torch.randn(batch, images, 1, 3, image_size, image_size, generator=generator)
    return input_ids, attention_mask, vision_x


def quiet_median(values, loads):
    """Median of the samples taken while the rest of the machine was quiet (of all, if none was)."""
    quiet = [value for value, load in zip(values, loads) if not load.noisy]
    return statistics.median(quiet or values)


def load_summary(loads) -> dict:
    return {
        "other_cpu_s": [load.other_cpu_seconds for load in loads],
        "noisy_samples": sum(load.noisy for load in loads),
        "samples": len(loads),
    }


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), False
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.increase = self.peak - self.start


def run_generate(name, model, input_ids, attention_mask, vision_x, new_tokens, beams, clock=None):
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, do_sample=False, eos_token_id=None)
    if clock is not None:
        common["logits_processor"] = LogitsProcessorList([clock])
    with torch.no_grad():
        if name == "openflamingo":
            return model.generate(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask, pad_token_id=0, **common)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=vision_x, suppress_tokens=[], **common)


def benchmark(models, tokenizer, image_size, repeats):
    input_ids, attention_mask, vision_x = inputs(tokenizer, 1, 1, image_size)
    for name, model in models.items():  # warm-up: first calls pay for lazy initialisation
        run_generate(name, model, input_ids, attention_mask, vision_x, 4, 1)
    rows = []
    for batch in (1, 8):
        for images in (1, 4):
            for beams in (1, 3):
                input_ids, attention_mask, vision_x = inputs(tokenizer, batch, images, image_size)
                row = {"batch": batch, "images": images, "beams": beams}
                times = {name: [] for name in models}
                rates = {name: [] for name in models}
                loads = {name: [] for name in models}
                for _ in range(repeats):
                    for name, model in models.items():  # alternating: one implementation, then the other
                        clock = StepClock(torch.device("cpu"))
                        with OtherLoad() as load:
                            tokens = run_generate(name, model, input_ids, attention_mask, vision_x, NEW_TOKENS, beams, clock)
                        times[name].append(load.wall_seconds)
                        rates[name].append(clock.rate(batch))
                        loads[name].append(load)
                        row[f"{name}_tokens"] = tokens[:, -NEW_TOKENS:].tolist()
                for name in models:
                    row[f"{name}_generate_s"] = quiet_median(times[name], loads[name])
                    row[f"{name}_decode_tokens_per_s"] = quiet_median(rates[name], loads[name])
                    row[f"{name}_load"] = load_summary(loads[name])
                row["same_tokens"] = row.pop("openflamingo_tokens") == row.pop("flaminko_tokens")
                row["generate_speedup"] = row["openflamingo_generate_s"] / row["flaminko_generate_s"]
                row["decode_speedup"] = row["flaminko_decode_tokens_per_s"] / row["openflamingo_decode_tokens_per_s"]
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def fastest_quiet(run, repeats: int, sample_seconds: float = 0.5) -> tuple[float, list]:
    """(seconds of one call in the fastest sample taken while the rest of the machine was quiet, or
    in the fastest of all if none was; every sample's OtherLoad), after one untimed call. A sample
    repeats the call for about sample_seconds: /proc/stat counts in 10 ms ticks, too coarse to judge
    the load during a single call of a few milliseconds."""
    start = time.perf_counter()
    run()
    calls = max(1, math.ceil(sample_seconds / max(time.perf_counter() - start, 1e-6)))
    timed = []
    for _ in range(repeats):
        with OtherLoad() as load:
            for _ in range(calls):
                run()
        timed.append(load)
    quiet = [load for load in timed if not load.noisy] or timed
    return min(load.wall_seconds for load in quiet) / calls, timed


def streaming_read_bandwidth(gigabytes: float = 0.5) -> tuple[float, list]:
    """Bytes per second at which this machine's cores stream through memory together (a sum over more
    data than any cache holds, best of 5): the hardware's bound on reading weights."""
    data = torch.randn(int(gigabytes * 2**30 / 4))
    seconds, loads = fastest_quiet(data.sum, 5)
    return data.numel() * data.element_size() / seconds, loads


def matrix_vector_seconds(model, threads: int) -> tuple[float, int, list]:
    """(seconds, bytes, OtherLoads) of one pass of PyTorch's own matrix-vector product on `threads`
    threads over every matrix a decoded token reads, with this model's shapes (best of 5): a
    decoding step with nothing else in it."""
    matrices = [p for p in decode_matrices(model) if p.ndim == 2]
    vectors = {width: torch.randn(1, width) for width in {m.shape[1] for m in matrices}}

    def one_pass():
        with torch.no_grad():
            for matrix in matrices:
                torch.nn.functional.linear(vectors[matrix.shape[1]], matrix)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds, loads = fastest_quiet(one_pass, 5)
    finally:
        torch.set_num_threads(previous)
    return seconds, sum(m.numel() * m.element_size() for m in matrices), loads


def decode_bound(model, rows):
    """Batch-1 decoding against two bounds: the hardware's (every token reads the decode weights and
    the cached media keys/values once, at the streaming bandwidth) and PyTorch's matrix-vector
    kernel's, on one thread and on all of them (the faster of the two is the bound)."""
    per_token = bytes_read_per_token(model)
    streaming, streaming_loads = streaming_read_bandwidth()
    threads = torch.get_num_threads()
    kernel = {count: matrix_vector_seconds(model, count) for count in sorted({1, threads})}
    matrix_bytes = kernel[threads][1]
    fastest = min(seconds for seconds, _, _ in kernel.values())
    row = next(r for r in rows if (r["batch"], r["images"], r["beams"]) == (1, 1, 1))
    result = {
        "bytes_read_per_token": per_token,
        "streaming_bytes_per_s": streaming,
        "streaming_load": load_summary(streaming_loads),
        "streaming_bound_tokens_per_s": streaming / per_token,
        "matrix_vector_bytes": matrix_bytes,
        "matrix_vector": {
            str(count): {"seconds": seconds, "bytes_per_s": matrix_bytes / seconds, "load": load_summary(loads)}
            for count, (seconds, _, loads) in kernel.items()
        },
        "matrix_vector_s": fastest,
        "matrix_vector_bound_tokens_per_s": 1 / fastest,
    }
    for name in ("flaminko", "openflamingo"):
        rate = row[f"{name}_decode_tokens_per_s"]
        result[f"{name}_fraction_of_streaming_bound"] = rate / result["streaming_bound_tokens_per_s"]
        result[f"{name}_fraction_of_matrix_vector_bound"] = rate / result["matrix_vector_bound_tokens_per_s"]
    return result


def train_step(name, model, input_ids, attention_mask, vision_x, labels):
    model.zero_grad(set_to_none=True)
    if name == "openflamingo":
        loss = model(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask, labels=labels).loss
    else:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=vision_x, labels=labels).loss
    loss.backward()


def training_inputs(tokenizer, image_size):
    input_ids, attention_mask, vision_x = inputs(tokenizer, 4, 2, image_size)
    return input_ids, attention_mask, vision_x, input_ids.masked_fill(attention_mask == 0, -100)


def training_time(models, tokenizer, image_size, repeats):
    batch = training_inputs(tokenizer, image_size)
    loads = {name: [] for name in models}
    for name, model in models.items():
        model.train()
        train_step(name, model, *batch)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            with OtherLoad() as load:
                train_step(name, model, *batch)
            loads[name].append(load)
    for model in models.values():
        model.eval()
    result = {}
    for name, samples in loads.items():
        result[f"{name}_train_step_s"] = quiet_median([load.wall_seconds for load in samples], samples)
        result[f"{name}_train_load"] = load_summary(samples)
    result["train_step_ratio"] = result["flaminko_train_step_s"] / result["openflamingo_train_step_s"]
    return result


def training_memory(models, tokenizer, image_size):
    """Bytes a training step keeps: tensors saved for backward plus gradients, counted by autograd
    (resident memory on a CPU mostly measures the allocator, not the model)."""
    batch = training_inputs(tokenizer, image_size)
    result = {}
    for name, model in models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            train_step(name, model, *batch)
        gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        result[f"{name}_train_saved_bytes"] = sum(saved)
        result[f"{name}_train_gradient_bytes"] = gradients
        model.zero_grad(set_to_none=True)
        model.eval()
    ours = result["flaminko_train_saved_bytes"] + result["flaminko_train_gradient_bytes"]
    theirs = result["openflamingo_train_saved_bytes"] + result["openflamingo_train_gradient_bytes"]
    result["train_memory_ratio"] = ours / theirs
    return result


def load(name, folder: Path):
    if name == "openflamingo":
        model, tokenizer = build_open_flamingo(folder / "vision", folder / "lm", 1)
        model.load_state_dict(torch.load(folder / "checkpoint.pt", weights_only=True), strict=False)
        return model.eval(), tokenizer
    model = FlaminkoForConditionalGeneration.from_pretrained(folder / "flaminko").eval()
    return model, AutoTokenizer.from_pretrained(folder / "flaminko")


def measure_memory(name: str, task: str, folder: Path) -> int:
    """Peak resident memory above the loaded model while one call of the task runs, in a fresh
    process so that neither implementation inherits the other's freed-but-kept memory."""
    model, tokenizer = load(name, folder)
    image_size = CLIPVisionConfig.from_pretrained(folder / "vision").image_size
    # A small call first: weights loaded from safetensors are memory-mapped and only become resident
    # when first read, which would otherwise count against the implementation that maps them.
    run_generate(name, model, *inputs(tokenizer, 1, 1, image_size), 2, 1)
    # Loading frees differently in the two implementations; give freed heap memory back to the system
    # first, so that neither call is measured on top of reusable memory the other lacks.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if task == "train":
        batch = training_inputs(tokenizer, image_size)
        model.train()
        with PeakMemory() as memory:
            train_step(name, model, *batch)
    else:
        input_ids, attention_mask, vision_x = inputs(tokenizer, 8, 4, image_size)
        with PeakMemory() as memory:
            run_generate(name, model, input_ids, attention_mask, vision_x, NEW_TOKENS, 3)
    return memory.increase


def memory_in_fresh_processes(folder: Path):
    result = {}
    for task in ("generate",):
        for name in ("openflamingo", "flaminko"):
            command = [sys.executable, __file__, "--child", name, task, str(folder)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result[f"{name}_{task}_peak_bytes"] = int(output.strip().splitlines()[-1])
        result[f"{task}_memory_ratio"] = result[f"flaminko_{task}_peak_bytes"] / max(1, result[f"openflamingo_{task}_peak_bytes"])
    return result


def describe_loads(*summaries) -> str:
    """"2.31 s, 1/6 noisy": the most CPU time others used during one sample, and the noisy count."""
    others = [seconds for summary in summaries for seconds in summary["other_cpu_s"]]
    noisy = sum(summary["noisy_samples"] for summary in summaries)
    total = sum(summary["samples"] for summary in summaries)
    return f"{max(others):.2f} s, {noisy}/{total} noisy" + (" NOISY" if noisy == total else "")


def markdown(results):
    lines = [
        f"Shape `{results['shape']}` ({results['layers']} layers each), CPU ({results['threads']} threads), median of {results['repeats']}; "
        f"{describe_setup(results['measured_on'])}.",
        "",
        "| batch | images | beams | generate OpenFlamingo (s) | generate Flaminko (s) | speed-up | decode tok/s OF | decode tok/s Flaminko | decode speed-up | same tokens | others' CPU s (max), noisy samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["generation"]:
        lines.append(
            f"| {row['batch']} | {row['images']} | {row['beams']} | {row['openflamingo_generate_s']:.2f} | "
            f"{row['flaminko_generate_s']:.2f} | {row['generate_speedup']:.2f}x | {row['openflamingo_decode_tokens_per_s']:.1f} | "
            f"{row['flaminko_decode_tokens_per_s']:.1f} | {row['decode_speedup']:.2f}x | {row['same_tokens']} | "
            f"{describe_loads(row['openflamingo_load'], row['flaminko_load'])} |"
        )
    train = results["training"]
    memory = results["memory"]
    lines += [
        "",
        f"Training step (batch 4, 2 images, forward + backward): OpenFlamingo {train['openflamingo_train_step_s']:.2f} s, "
        f"Flaminko {train['flaminko_train_step_s']:.2f} s (ratio {train['train_step_ratio']:.2f}; others' CPU s (max), noisy samples: "
        f"{describe_loads(train['openflamingo_train_load'], train['flaminko_train_load'])}).",
        f"Training-step memory (saved for backward + gradients, counted by autograd): OpenFlamingo "
        f"{(memory['openflamingo_train_saved_bytes'] + memory['openflamingo_train_gradient_bytes']) / 2**20:.0f} MiB, Flaminko "
        f"{(memory['flaminko_train_saved_bytes'] + memory['flaminko_train_gradient_bytes']) / 2**20:.0f} MiB "
        f"(ratio {memory['train_memory_ratio']:.2f}). Peak resident memory above the loaded model (weights paged in by a first small call) in a fresh process, "
        f"generate (batch 8, 4 images, beam 3): OpenFlamingo "
        f"{memory['openflamingo_generate_peak_bytes'] / 2**20:.0f} MiB, Flaminko {memory['flaminko_generate_peak_bytes'] / 2**20:.0f} MiB "
        f"(ratio {memory['generate_memory_ratio']:.2f}).",
    ]
    if "decode_bound" in results:
        bound = results["decode_bound"]
        kernel = "; ".join(
            f"{float(timing['seconds']) * 1e3:.1f} ms on {count} thread{'s' if count != '1' else ''} "
            f"({timing['bytes_per_s'] / 1e9:.1f} GB/s, {describe_loads(timing['load'])})"
            for count, timing in bound["matrix_vector"].items()
        )
        lines.append(
            f"Batch-1 decode (1 image) against its bounds: a token reads {bound['bytes_read_per_token'] / 2**20:.0f} MiB "
            f"(LM and cross-attention weights, media keys/values). Streamed at the machine's "
            f"{bound['streaming_bytes_per_s'] / 1e9:.1f} GB/s (a sum over 0.5 GiB on all cores; {describe_loads(bound['streaming_load'])}), "
            f"that allows {bound['streaming_bound_tokens_per_s']:.1f} tok/s: Flaminko reaches "
            f"{bound['flaminko_fraction_of_streaming_bound']:.0%}, OpenFlamingo {bound['openflamingo_fraction_of_streaming_bound']:.0%}. "
            f"PyTorch's matrix-vector product alone, once over each of these matrices ({bound['matrix_vector_bytes'] / 2**20:.0f} MiB), "
            f"takes {kernel}; at the faster, at most {bound['matrix_vector_bound_tokens_per_s']:.1f} tok/s with its kernels: "
            f"Flaminko reaches {bound['flaminko_fraction_of_matrix_vector_bound']:.0%}, "
            f"OpenFlamingo {bound['openflamingo_fraction_of_matrix_vector_bound']:.0%}."
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, help="fewer layers (vision and LM) than the shape has, for CPUs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--memory-only", action="store_true", help="measure peak memory only (update --out)")
    parser.add_argument("--child", nargs=3, metavar=("IMPLEMENTATION", "TASK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure_memory(args.child[0], args.child[1], Path(args.child[2])))
        return
    scratch = Path(tempfile.mkdtemp())
    try:
        reference, tokenizer, ours = build(args.shape, args.layers, scratch)
        models = {"openflamingo": reference, "flaminko": ours}
        image_size = ours.config.vision_config.image_size
        if args.memory_only:
            results = json.loads(Path(args.out).read_text())
            results["memory"] = training_memory(models, tokenizer, image_size)
            del models, reference, ours
            results["memory"].update(memory_in_fresh_processes(scratch))
            table = markdown(results)
            print(table)
            Path(args.out).write_text(json.dumps({**results, "markdown": table}, indent=2))
            return
        results = {
            "shape": args.shape,
            "layers": ours.config.text_config.num_hidden_layers,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "measured_on": setup(),
            "generation": benchmark(models, tokenizer, image_size, args.repeats),
            "training": training_time(models, tokenizer, image_size, args.repeats),
        }
        results["decode_bound"] = decode_bound(ours, results["generation"])
        results["memory"] = training_memory(models, tokenizer, image_size)
        del models, reference, ours
        results["memory"].update(memory_in_fresh_processes(scratch))
    finally:
        shutil.rmtree(scratch)
    table = markdown(results)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**results, "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
