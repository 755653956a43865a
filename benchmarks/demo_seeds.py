"""`flaminko demo` at every seed and thread count: exact match on seen and unseen combinations, and the time.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 5 6 7 8 9 --threads 1 2 --out benchmarks/results/demo-seeds.json

Each run is `flaminko demo --seed N` as a user runs it (default budget) in a fresh process with
OMP_NUM_THREADS=T (torch takes its thread count from it), one after another, with the CPU time
other processes used meanwhile beside its time: the accuracies do not depend on the load, the times
do. The thread count changes the order of the float sums in torch's CPU kernels, as another CPU does,
so the runs at several thread counts show how far the figures move with it. Prints a markdown table
with the minimum and the median and writes every run, with the CPU model and the versions, to --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import OtherLoad, describe_setup, setup


def run_demo(seed: int, threads: int, steps: int | None, work: Path) -> dict:
    out = work / f"seed-{seed}-threads-{threads}"
    command = [sys.executable, "-m", "flaminko.cli", "demo", "--seed", str(seed), "--out", str(out)]
    if steps is not None:
        command += ["--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with OtherLoad() as load:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    results = json.loads((out / "results.json").read_text())
    if results["threads"] != threads:
        raise RuntimeError(f"asked for {threads} threads, the demo ran with {results['threads']}")
    return {
        "seed": seed,
        "threads": threads,
        "steps": results["steps"],
        "seen": results["accuracy_seen_combinations"],
        "unseen": results["accuracy_unseen_combinations"],
        "seconds": results["seconds"],
        "other_cpu_seconds": load.other_cpu_seconds,
        "other_cores": load.other_cores,
        **setup(),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--steps", type=int, default=None, help="the demo's default budget when not given")
    parser.add_argument("--out", default="results/demo-seeds.json")
    parser.add_argument("--keep", help="a folder to keep each run's demo folder in (seed-N-threads-T); a temporary one when not given")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as temporary:
        work = args.keep or temporary
        for threads in args.threads:
            for seed in args.seeds:
                runs.append(run_demo(seed, threads, args.steps, Path(work)))
                run = runs[-1]
                print(f"seed {seed}, {threads} thread(s): seen {run['seen']:.1%}, unseen {run['unseen']:.1%}, "
                      f"{run['seconds']:.0f} s (others used {run['other_cores']:.2f} cores)", flush=True)
                # Written after every run, so that a long series stopped midway keeps what it measured.
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(runs, indent=2) + "\n")
    print(describe_setup(runs[0]))
    print("| seed | threads | seen combinations (240) | unseen combinations (160) | time | other processes |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['seed']} | {run['threads']} | {run['seen']:.1%} | {run['unseen']:.1%} | {run['seconds']:.0f} s | "
              f"{run['other_cores']:.2f} cores |")
    for name, pick in (("min", min), ("median", statistics.median)):
        print(f"| {name} | | {pick(r['seen'] for r in runs):.1%} | {pick(r['unseen'] for r in runs):.1%} | "
              f"{pick(r['seconds'] for r in runs):.0f} s | |")


if __name__ == "__main__":
    main()
