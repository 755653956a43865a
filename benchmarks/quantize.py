"""Quantized Flaminko on a CPU: batch-1 decode rate, weight memory and error against float32 eager.

    python benchmarks/quantize.py --shape small --out benchmarks/results/quantize-small.json
    python benchmarks/quantize.py --model flaminko-demo/run/final --data flaminko-demo/data/test_unseen.tsv \
        --limit 160 --out benchmarks/results/quantize-demo.json

Variants, each loaded afresh from one saved folder: float32 eager (the reference), bfloat16,
`flaminko.quantize` (PyTorch's dynamic int8; also with the gated blocks left float32), and
`from_pretrained(quantization_config=...)` with optimum-quanto int8 (bfloat16 activations), torchao
int8 weight-only and bitsandbytes 8-bit where installed. Timings alternate between the variants
(generate, batch 1, one image, greedy, --new-tokens tokens; the rate counts decoding steps only),
take medians over --repeats, and record the CPU time other processes used meanwhile (OtherLoad):
noisy samples are flagged and left out of the median where quiet ones exist.

Error: on --data (the demo's images; random images otherwise) each variant is fed float32's greedy
continuation of every prompt; "agreement" is the share of those positions where its own greedy
choice is the same token, "same output" the share of prompts whose free-running greedy output is
identical; "logits error" is |variant - fp32| / |fp32| (Frobenius) on the prompts. Random weights
give near-flat logits, so judge agreement on a trained model (the demo's).
"""

import argparse
import csv
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).parent))
import flaminko  # noqa: E402
from flaminko import FlaminkoForConditionalGeneration, tiny  # noqa: E402
from gpu import StepClock  # noqa: E402
from machine import OtherLoad  # noqa: E402

SHAPES = {
    # As benchmarks/compare.py's `small`: ViT-B/16-like vision + 12-layer 768-wide GPT-NeoX.
    "small": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, rotary_pct=0.25),
    },
    # For checking the script quickly.
    "tiny": {"vision": dict(hidden_size=64, num_hidden_layers=2), "text": dict(hidden_size=64, num_hidden_layers=2)},
}


def build_random(shape: str, folder: Path) -> Path:
    """A Flaminko of the shape with random weights and open gates, saved to folder/flaminko."""
    torch.manual_seed(0)
    vision = tiny.save_tiny_vision(folder / "vision", **SHAPES[shape]["vision"])
    language = tiny.save_tiny_language_model(folder / "lm", "gpt_neox", vocab_size=2000, **SHAPES[shape]["text"])
    model, processor = FlaminkoForConditionalGeneration.from_backbones(vision, language)
    with torch.no_grad():
        for block in model.cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    model.save_pretrained(folder / "flaminko")
    processor.save_pretrained(folder / "flaminko")
    return folder / "flaminko"


def _installed(module_name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def variants() -> dict:
    """name -> function(folder) returning the loaded (and quantized) model."""
    load = FlaminkoForConditionalGeneration.from_pretrained
    found = {
        "fp32 eager": lambda folder: load(folder),
        "bf16": lambda folder: load(folder, dtype=torch.bfloat16),
        "flaminko.quantize (dynamic int8)": lambda folder: flaminko.quantize(load(folder)),
        "flaminko.quantize, gated blocks fp32": lambda folder: flaminko.quantize(
            load(folder), modules_to_not_convert=FlaminkoForConditionalGeneration._modules_not_to_quantize
        ),
    }
    if _installed("optimum.quanto"):
        from transformers import QuantoConfig

        found["quanto int8, bf16 activations"] = lambda folder: load(
            folder, dtype=torch.bfloat16, quantization_config=QuantoConfig(weights="int8")
        )
    if _installed("torchao"):
        from transformers import TorchAoConfig

        def torchao_int8(folder):
            from torchao.quantization import Int8WeightOnlyConfig

            return load(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))

        found["torchao int8 weight-only"] = torchao_int8
    if _installed("bitsandbytes"):
        from transformers import BitsAndBytesConfig

        found["bitsandbytes 8-bit"] = lambda folder: load(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    return found


def weight_bytes(model) -> int:
    """Bytes of the model's serialised state dict: what its weights take, whatever their format."""
    buffer = io.BytesIO()
    try:
        torch.save(model.state_dict(), buffer)
    except Exception:  # a quantized tensor format that does not serialise
        return -1
    return buffer.tell()


def prompts(processor, data: str | None, prompt: str, limit: int, image_size: int) -> list[dict]:
    if data:
        with open(data, encoding="utf-8") as table:
            rows = list(csv.DictReader(table, delimiter="\t"))[:limit]
        images = [Image.open(Path(data).parent / row["image"]).convert("RGB") for row in rows]
    else:
        generator = torch.Generator().manual_seed(0)
        images = [
            Image.fromarray(torch.randint(0, 256, (image_size, image_size, 3), generator=generator, dtype=torch.uint8).numpy())
            for _ in range(limit)
        ]
    return [processor(text=prompt, images=[image], return_tensors="pt") for image in images]


def greedy(model, batch, new_tokens, clock=None):
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList([clock]) if clock else None,
        )[0, batch["input_ids"].shape[1]:]


def accuracy(model, reference_outputs, batches, new_tokens, suppressed: int | None) -> dict:
    """Agreement with float32's greedy tokens (teacher-forced), identical outputs, logits error."""
    agree = positions = same = 0
    errors = []
    for batch, (reference_tokens, reference_logits) in zip(batches, reference_outputs):
        sequence = torch.cat([batch["input_ids"][0], reference_tokens])[None]
        with torch.no_grad():
            logits = model(
                input_ids=sequence, attention_mask=torch.ones_like(sequence), pixel_values=batch["pixel_values"]
            ).logits[0].float()
        prompt_length = batch["input_ids"].shape[1]
        errors.append(((logits[:prompt_length] - reference_logits).norm() / reference_logits.norm()).item())
        choices = logits[prompt_length - 1 : -1]
        if suppressed is not None:
            choices[:, suppressed] = float("-inf")
        agree += (choices.argmax(-1) == reference_tokens).sum().item()
        positions += len(reference_tokens)
        same += torch.equal(greedy(model, batch, new_tokens), reference_tokens)
    return {"agreement": agree / positions, "same_output": same / len(batches), "logits_error": statistics.median(errors)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved Flaminko folder (e.g. flaminko-demo/run/final); default: random weights of --shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--data", help="TSV with an `image` column (paths relative to it) for the error figures")
    parser.add_argument("--prompt", default="<image>", help="prompt for every image (default: the demo's)")
    parser.add_argument("--limit", type=int, default=10, help="prompts for the error figures (the demo model is fast: 160)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory()
    folder = Path(args.model) if args.model else build_random(args.shape, Path(scratch.name))
    processor = AutoProcessor.from_pretrained(folder)
    models = {name: make(folder).eval() for name, make in variants().items()}
    reference = models["fp32 eager"]
    image_size = reference.config.vision_config.image_size
    batches = prompts(processor, args.data, args.prompt, args.limit, image_size)
    reference_outputs = []
    for batch in batches:
        tokens = greedy(reference, batch, args.new_tokens)
        with torch.no_grad():
            reference_outputs.append((tokens, reference(**batch).logits[0].float()))

    timed = batches[0]
    fixed = dict(min_new_tokens=args.new_tokens, eos_token_id=None)
    for model in models.values():  # warm-up: first calls pay for lazy initialisation and packing
        greedy(model, timed, 4)
    samples = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():  # alternating, so every variant sees the same conditions
            clock = StepClock(torch.device("cpu"))
            with OtherLoad() as load, torch.no_grad():
                model.generate(**timed, max_new_tokens=args.new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]), **fixed)
            samples[name].append({"tokens_per_s": clock.rate(1), "other_cpu_s": load.other_cpu_seconds, "noisy": load.noisy})

    rows = []
    for name, model in models.items():
        quiet = [s for s in samples[name] if not s["noisy"]] or samples[name]
        row = {
            "variant": name,
            "decode_tokens_per_s": statistics.median(s["tokens_per_s"] for s in quiet),
            "samples": samples[name],
            "noisy_samples": sum(s["noisy"] for s in samples[name]),
            "median_other_cpu_s": statistics.median(s["other_cpu_s"] for s in samples[name]),
            "weight_bytes": weight_bytes(model),
            **({} if model is reference else accuracy(model, reference_outputs, batches, args.new_tokens, reference.config.media_token_id)),
        }
        rows.append(row)
    base = rows[0]["decode_tokens_per_s"]
    lines = [
        f"Model {'`' + str(args.model) + '`' if args.model else f'random, shape `{args.shape}`'}, CPU ({torch.get_num_threads()} threads), "
        f"batch 1, 1 image, {args.new_tokens} new tokens, median of {args.repeats} (noisy samples left out where quiet ones exist); "
        f"error on {len(batches)} prompts ({'`' + args.data + '`' if args.data else 'random images'}).",
        "",
        "| variant | decode tok/s | vs fp32 | others' CPU s per sample (median), noisy samples | weights MiB | greedy agreement | same output | logits error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        error = (
            f"{row['agreement']:.1%} | {row['same_output']:.1%} | {row['logits_error']:.4f}" if "agreement" in row else "(reference) | | "
        )
        memory = f"{row['weight_bytes'] / 2**20:.1f}" if row["weight_bytes"] >= 0 else "n/a"
        lines.append(
            f"| {row['variant']} | {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base:.2f}x | "
            f"{row['median_other_cpu_s']:.2f}, {row['noisy_samples']}/{len(row['samples'])} | {memory} | {error} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        results = {"model": args.model, "shape": None if args.model else args.shape, "data": args.data, "rows": rows, "markdown": table}
        Path(args.out).write_text(json.dumps(results, indent=2))
    scratch.cleanup()


if __name__ == "__main__":
    main()
