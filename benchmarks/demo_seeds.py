"""`flaminko demo` at every seed: exact match on seen and unseen combinations, and the time.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --out results/demo-seeds.json

Each seed runs `flaminko demo --seed N` as a user does (default budget, default threads) in a fresh
process, one after another, with the CPU time other processes used meanwhile beside its time: the
accuracies do not depend on the load, the times do. Prints a markdown table with the minimum and the
median and writes every run to --out.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import OtherLoad


def run_seed(seed: int, steps: int | None, work: Path) -> dict:
    out = work / f"seed-{seed}"
    command = [sys.executable, "-m", "flaminko.cli", "demo", "--seed", str(seed), "--out", str(out)]
    if steps is not None:
        command += ["--steps", str(steps)]
    with OtherLoad() as load:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads((out / "results.json").read_text())
    return {
        "seed": seed,
        "steps": results["steps"],
        "seen": results["accuracy_seen_combinations"],
        "unseen": results["accuracy_unseen_combinations"],
        "seconds": results["seconds"],
        "other_cpu_seconds": load.other_cpu_seconds,
        "other_cores": load.other_cores,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="the demo's default budget when not given")
    parser.add_argument("--out", default="results/demo-seeds.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            runs.append(run_seed(seed, args.steps, Path(work)))
            run = runs[-1]
            print(f"seed {seed}: seen {run['seen']:.1%}, unseen {run['unseen']:.1%}, {run['seconds']:.0f} s "
                  f"(others used {run['other_cores']:.2f} cores)", flush=True)
    print("| seed | seen combinations (240) | unseen combinations (160) | time | other processes |")
    print("|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['seed']} | {run['seen']:.1%} | {run['unseen']:.1%} | {run['seconds']:.0f} s | {run['other_cores']:.2f} cores |")
    for name, pick in (("min", min), ("median", statistics.median)):
        print(f"| {name} | {pick(r['seen'] for r in runs):.1%} | {pick(r['unseen'] for r in runs):.1%} | "
              f"{pick(r['seconds'] for r in runs):.0f} s | |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
