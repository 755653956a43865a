"""On a CPU, is the compiled static-cache decoding path at least as fast as the uncompiled dynamic cache?

    python benchmarks/compile_cpu.py --out benchmarks/results/compile-cpu.json

Batch 1, one image, a small shape (the OpenFlaminKO shape with --layers layers, widths divided by
--width-divisor; random weights, sdpa), greedy decoding of --new-tokens tokens, three ways:
`dynamic` (DynamicCache, not compiled: what generate does by default), `static` (StaticCache, not
compiled) and `compiled` (StaticCache and transformers' automatic compile of the decoding step,
here with inductor in its default mode: on a CPU there are no CUDA graphs to capture). Each is
warmed up by a full untimed run (inductor compiles there), then they alternate within each of
--repeats rounds; medians of decode tokens/s and of time to first token are reported, each sample
wrapped in benchmarks/machine.py's OtherLoad (CPU time other processes used meanwhile; NOISY marks
a loaded machine). Checks that the three give the same tokens.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from gpu import StepClock, build, generation_kwargs, inputs
from machine import OtherLoad, describe_setup, setup

CACHES = ("dynamic", "static", "compiled")


def decode(model, new_tokens, cache, compile_backend):
    """(decode tokens/s, seconds to the first logits, generated tokens)."""
    device = torch.device("cpu")
    torch.manual_seed(0)  # the same prompt and image for every way, so that their tokens compare
    input_ids, attention_mask, pixel_values = inputs(model, 1, 32, device, torch.float32)
    clock = StepClock(device)
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, logits_processor=LogitsProcessorList([clock]),
            **generation_kwargs(cache, device, compile_backend),
        )
    return clock.rate(1), clock.times[0] - start, tokens[:, -new_tokens:].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width-divisor", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out")
    args = parser.parse_args()
    model = build(args.layers, args.width_divisor, torch.float32, torch.device("cpu"), "sdpa")
    warm_up = {}
    for cache in CACHES:
        start = time.perf_counter()
        warm_up[cache] = {"seconds": None, "tokens": decode(model, args.new_tokens, cache, args.compile_backend)[2]}
        warm_up[cache]["seconds"] = time.perf_counter() - start
        print(f"warm-up {cache}: {warm_up[cache]['seconds']:.1f} s (compilation included)", flush=True)
    samples = {cache: [] for cache in CACHES}
    for round_index in range(args.repeats):  # alternating: each way once per round
        for cache in CACHES:
            with OtherLoad() as load:
                rate, first, _ = decode(model, args.new_tokens, cache, args.compile_backend)
            samples[cache].append({"decode_tokens_per_s": rate, "time_to_first_token_s": first,
                                   "other_cpu_seconds": load.other_cpu_seconds, "other_cores": load.other_cores,
                                   "noisy": load.noisy, "describe": load.describe()})
            print(f"round {round_index + 1} {cache}: {rate:.1f} tok/s, first token {first * 1e3:.0f} ms ({load.describe()})", flush=True)
    results = {"layers": args.layers, "width_divisor": args.width_divisor, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "threads": torch.get_num_threads(), "compile_backend": args.compile_backend,
               "measured_on": setup(), "same_tokens": all(warm_up[cache]["tokens"] == warm_up["dynamic"]["tokens"] for cache in CACHES),
               "warm_up_seconds": {cache: warm_up[cache]["seconds"] for cache in CACHES}, "runs": []}
    for cache in CACHES:
        rows = samples[cache]
        results["runs"].append({
            "cache": cache,
            "decode_tokens_per_s": statistics.median(row["decode_tokens_per_s"] for row in rows),
            "time_to_first_token_s": statistics.median(row["time_to_first_token_s"] for row in rows),
            "samples": rows,
        })
    dynamic = results["runs"][0]["decode_tokens_per_s"]
    lines = [f"CPU ({results['threads']} threads), batch 1, one image, {args.layers} layers, widths / {args.width_divisor}, "
             f"{args.new_tokens} new tokens, median of {args.repeats}; same tokens: {results['same_tokens']}; "
             f"{describe_setup(results['measured_on'])}", "",
             "| decoding | decode tok/s | vs dynamic | first token (ms) | warm-up (s) | others' load (worst sample) |",
             "|---|---|---|---|---|---|"]
    for run in results["runs"]:
        worst = max(run["samples"], key=lambda row: row["other_cores"])
        noisy = sum(row["noisy"] for row in run["samples"])
        lines.append(
            f"| {run['cache']} | {run['decode_tokens_per_s']:.1f} | {run['decode_tokens_per_s'] / dynamic:.2f}x | "
            f"{run['time_to_first_token_s'] * 1e3:.0f} | {results['warm_up_seconds'][run['cache']]:.1f} | {worst['describe']}"
            + (f"; {noisy}/{len(run['samples'])} noisy" if noisy else "") + " |"
        )
    results["markdown"] = "\n".join(lines)
    print(results["markdown"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
