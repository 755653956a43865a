"""Where a decoding step's time goes, for Flaminko and OpenFlamingo on the same weights (torch.profiler).

    python benchmarks/profile_decode.py --shape small --layers 12 --images 4

Prints the operators with the most self CPU time over 16 greedy decoding steps of each.
"""

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from compare import build, inputs, run_generate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        reference, tokenizer, ours = build(args.shape, args.layers, Path(scratch))
    batch = inputs(tokenizer, args.batch, args.images, ours.config.vision_config.image_size)
    for name, model in (("openflamingo", reference), ("flaminko", ours)):
        run_generate(name, model, *batch, 2, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_generate(name, model, *batch, 17, 1)
        print(f"\n## {name}: 17 new tokens (prefill + 16 decoding steps)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
