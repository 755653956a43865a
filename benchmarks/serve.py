"""`flaminko serve` under load: requests/s and time to first token at 1 and 8 concurrent clients.

    python benchmarks/serve.py --out benchmarks/results/serve.json
    python benchmarks/serve.py --layers 2 --rounds 1 --requests 1    # a quick check that it runs

Builds a Flaminko model of compare.py's shape (random weights, gates open, nothing downloaded),
serves it twice in this process on loopback -- batching (up to 8 requests in one generate batch)
and sequential (--max-batch-size 1: one request at a time, as transformers serve runs them) --
and has N clients (threads with the official `openai` client) each stream R chat completions of one
image and a short prompt, greedy, a fixed number of new tokens. Alternates the two servers and the
client counts in every round and reports medians: requests/s (requests / wall time) and the median
time to first token (request sent -> first content chunk). The servers run in this process, so
benchmarks/machine.py's OtherLoad counts only other processes' CPU time beside each figure.
"""

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from compare import SHAPES
from machine import OtherLoad

from flaminko import FlaminkoForConditionalGeneration, register_auto_classes, tiny
from flaminko.serving import BackgroundServer, build_app

CLIENTS = (1, 8)
SERVERS = {"batching": 8, "sequential": 1}


def build(shape: str, layers: int | None, folder: Path) -> Path:
    torch.manual_seed(0)
    vision_overrides, text_overrides = dict(SHAPES[shape]["vision"]), dict(SHAPES[shape]["text"])
    if layers:
        vision_overrides["num_hidden_layers"] = text_overrides["num_hidden_layers"] = layers
    vision = tiny.save_tiny_vision(folder / "vision", **vision_overrides)
    language = tiny.save_tiny_language_model(folder / "lm", "gpt_neox", vocab_size=2000, **text_overrides)
    model, processor = FlaminkoForConditionalGeneration.from_backbones(vision, language)
    with torch.no_grad():
        for block in model.cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    register_auto_classes()
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


def image_url(seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (224, 224, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(client, index: int, new_tokens: int) -> float:
    """Streams one answer; returns the seconds to its first content chunk."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(index)}}, {"type": "text", "text": f"사진 {index}:"}]}]
    start = time.perf_counter()
    first = None
    stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=new_tokens, temperature=0, stream=True)
    for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
    return first


def measure(url: str, clients: int, requests_per_client: int, new_tokens: int) -> dict:
    """A fresh client (connection pool) per measurement: connections left idle while the other server
    was measured are past uvicorn's keep-alive timeout, and reusing one as the server closes it
    resets it (no retries here, so that a failure shows)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    total = clients * requests_per_client
    with OtherLoad() as load, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        firsts = list(pool.map(lambda index: one_request(client, index, new_tokens), range(total)))
        seconds = time.perf_counter() - start
    return {"requests_per_second": total / seconds, "ttft_seconds": statistics.median(firsts), "load": load.describe(), "noisy": load.noisy}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, help="fewer layers (vision and LM) than the shape has")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in a measurement")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", help="JSON results file (e.g. benchmarks/results/serve.json)")
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as work:
        folder = build(args.shape, args.layers, Path(work))
        apps = {name: build_app(str(folder), served_model_name="bench", device="cpu", max_batch_size=size) for name, size in SERVERS.items()}
        samples = {(name, clients): [] for name in SERVERS for clients in CLIENTS}
        with BackgroundServer(apps["batching"]) as batching_url, BackgroundServer(apps["sequential"]) as sequential_url:
            urls = {"batching": batching_url, "sequential": sequential_url}
            for name in SERVERS:  # warm-up: first-call allocations out of the timings
                one_request(openai.OpenAI(base_url=urls[name], api_key="none", max_retries=0), 0, 2)
            for round_index in range(args.rounds):
                order = list(SERVERS) if round_index % 2 == 0 else list(reversed(SERVERS))
                for clients in CLIENTS:
                    for name in order:
                        sample = measure(urls[name], clients, args.requests, args.new_tokens)
                        samples[name, clients].append(sample)
                        print(json.dumps({"round": round_index, "server": name, "clients": clients, **sample}), flush=True)
    rows = []
    for (name, clients), runs in samples.items():
        quiet = [run for run in runs if not run["noisy"]] or runs
        rows.append(
            {
                "server": name,
                "clients": clients,
                "requests_per_second": statistics.median(run["requests_per_second"] for run in quiet),
                "ttft_seconds": statistics.median(run["ttft_seconds"] for run in quiet),
                "samples": len(runs),
                "noisy_samples": sum(run["noisy"] for run in runs),
                "loads": [run["load"] for run in runs],
            }
        )
    header = "| server | clients | requests/s | time to first token (s) | samples (noisy) | other load per sample |\n|---|---|---|---|---|---|"
    lines = [
        f"| {row['server']} | {row['clients']} | {row['requests_per_second']:.2f} | {row['ttft_seconds']:.2f} | "
        f"{row['samples']} ({row['noisy_samples']}) | {'; '.join(row['loads'])} |"
        for row in rows
    ]
    table = "\n".join([header, *lines])
    settings = {"shape": args.shape, "layers": args.layers, "rounds": args.rounds, "requests_per_client": args.requests, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    print(f"\n{settings}\nMedians over the quiet samples (all samples where none was quiet).\n{table}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows, "markdown": table}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
