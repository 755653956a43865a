"""`flaminko serve` under load: requests/s, time to first token and latency at 1, 8 and 32 concurrent
clients, short and long answers mixed.

    python benchmarks/serve.py --out benchmarks/results/serve.json
    python benchmarks/serve.py --clients 1 --long-every 1 --requests 1 --out benchmarks/results/serve-one-client-long.json  # one client, a long answer
    python benchmarks/serve.py --layers 2 --rounds 1 --requests 1 --long-tokens 16 --candidates 16    # a quick check that it runs

Builds a Flaminko model of compare.py's shape (random weights, gates open, nothing downloaded),
serves it three times in this process on loopback -- continuous (continuous batching, up to
--max-batch-size rows), micro-batching (the former scheduler: queued requests with the same settings
in one generate batch of up to --max-batch-size rows, run until its last row ends) and one-at-a-time
(micro-batching of one row: one request at a time, as transformers serve runs them) -- and has N
clients (threads with the official `openai` client) each stream R chat completions of one image and a
short prompt, greedy, all with the same settings (--long-tokens new tokens at most), whose answers are
short (they end within --short-tokens tokens) except every --long-every-th, which is long (it runs to
--long-tokens), as answers of one served model end where it stops. The random model does not stop by itself, so the
benchmark first reads its greedy answers to --candidates prompts (generate) and makes EOS the token
that splits them best: some answers reach it within --short-tokens, others never within
--long-tokens; those prompts are the ones sent. Micro-batching groups requests by their settings, so
lengths that came from different max_tokens would have run in separate batches, not the case this
compares. Alternates the
servers and the client counts in every round and reports medians over rounds: requests/s (requests /
wall time), and p50 and p95 of time to first token (request sent -> first content chunk) and of
latency (request sent -> last chunk). The servers run in this process, so benchmarks/machine.py's
OtherLoad counts only other processes' CPU time beside each figure.
"""

import argparse
import base64
import contextlib
import io
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor

from compare import SHAPES
from machine import OtherLoad, setup

from flaminko import FlaminkoForConditionalGeneration, register_auto_classes, tiny
from flaminko.serving import BackgroundServer, build_app

CLIENTS = (1, 8, 32)
PROBE_BATCH = 16
SERVERS = ("continuous", "micro-batching", "one-at-a-time")


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


def noise_image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (224, 224, 3), generator=generator, dtype=torch.uint8).numpy())


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    noise_image(seed).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def prompt_text(case: int) -> str:
    return f"사진 {case}:"


def mixed_lengths(folder: Path, candidates: int, short_tokens: int, long_tokens: int) -> dict:
    """Sets the model's EOS (in its saved generation config) to the token that splits the greedy answers
    to prompts 0..candidates-1 best, and returns it with the prompts whose answers reach it within
    short_tokens ("short", with each answer's length) and those whose answers never reach it within
    long_tokens ("long"). The prompts are laid out as the server lays out a chat message."""
    model = FlaminkoForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    answers = []
    for start in range(0, candidates, PROBE_BATCH):
        cases = range(start, min(start + PROBE_BATCH, candidates))
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text(case)}]}] for case in cases]
        prompts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
        batch = processor(text=prompts, images=[[noise_image(case)] for case in cases], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=long_tokens, do_sample=False, eos_token_id=None)
        answers += out[:, batch["input_ids"].shape[1] :].tolist()

    def split(token: int) -> tuple[dict[int, int], list[int]]:
        short = {case: answer.index(token) + 1 for case, answer in enumerate(answers) if token in answer[:short_tokens]}
        return short, [case for case, answer in enumerate(answers) if token not in answer]

    eos = max(sorted({token for answer in answers for token in answer}), key=lambda token: min(len(part) for part in split(token)))
    short, long = split(eos)
    if not short or not long:
        raise SystemExit(f"no token ends some of the {candidates} answers within {short_tokens} tokens and no other: try more --candidates")
    model.generation_config.eos_token_id = eos
    model.generation_config.save_pretrained(folder)
    return {"eos_token_id": eos, "short": short, "long": long}


def one_request(client, case: int, new_tokens: int) -> tuple[float, float]:
    """Streams one answer; returns the seconds to its first content chunk and to its end."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(case)}}, {"type": "text", "text": prompt_text(case)}]}]
    start = time.perf_counter()
    first = None
    stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=new_tokens, temperature=0, stream=True)
    for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)), 1) - 1]


def measure(url: str, clients: int, requests_per_client: int, workload: dict, new_tokens: int, long_every: int) -> dict:
    """Request i sends a long-answer prompt when i + 1 is a multiple of long_every, else a short-answer
    one, each asking for new_tokens at most. A fresh client (connection pool) per
    measurement: connections left idle while another server was measured are past uvicorn's keep-alive
    timeout, and reusing one as the server closes it resets it (no retries here, so that a failure shows)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    total = clients * requests_per_client
    with OtherLoad() as load, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        short, long = itertools.cycle(workload["short"]), itertools.cycle(workload["long"])
        cases = [next(long if (index + 1) % long_every == 0 else short) for index in range(total)]
        timings = list(pool.map(lambda case: one_request(client, case, new_tokens), cases))
        seconds = time.perf_counter() - start
    firsts, latencies = [first for first, _ in timings], [latency for _, latency in timings]
    return {
        "requests_per_second": total / seconds,
        "ttft_p50": percentile(firsts, 0.5),
        "ttft_p95": percentile(firsts, 0.95),
        "latency_p50": percentile(latencies, 0.5),
        "latency_p95": percentile(latencies, 0.95),
        "load": load.describe(),
        "noisy": load.noisy,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, help="fewer layers (vision and LM) than the shape has")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="concurrent clients of each measurement")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in a measurement")
    parser.add_argument("--short-tokens", type=int, default=4, help="the short answers end within this many tokens")
    parser.add_argument("--long-every", type=int, default=2, help="every so many requests, one has a long answer (2: half of them)")
    parser.add_argument("--long-tokens", type=int, default=256, help="every request's max_tokens; the long answers run to it")
    parser.add_argument("--candidates", type=int, default=32, help="prompts whose greedy answers choose the EOS and the requests")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows of continuous batching and of micro-batching")
    parser.add_argument("--out", help="JSON results file (e.g. benchmarks/results/serve.json)")
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as work:
        folder = build(args.shape, args.layers, Path(work))
        workload = mixed_lengths(folder, args.candidates, args.short_tokens, args.long_tokens)
        print(json.dumps({"workload": workload}), flush=True)
        # The queue holds every client's request: the comparison is of scheduling, not of admission.
        common = dict(served_model_name="bench", device="cpu", max_total_tokens=args.long_tokens + 128, max_queue=max(args.clients))
        settings_of = {
            "continuous": dict(scheduler="continuous", max_batch_size=args.max_batch_size),
            "micro-batching": dict(scheduler="micro-batching", max_batch_size=args.max_batch_size),
            "one-at-a-time": dict(scheduler="micro-batching", max_batch_size=1),
        }
        samples = {(name, clients): [] for name in SERVERS for clients in args.clients}
        with contextlib.ExitStack() as servers:
            urls = {name: servers.enter_context(BackgroundServer(build_app(str(folder), **common, **settings_of[name]))) for name in SERVERS}
            for name in SERVERS:  # warm-up: first-call allocations out of the timings
                one_request(openai.OpenAI(base_url=urls[name], api_key="none", max_retries=0), 0, 2)
            for round_index in range(args.rounds):
                order = list(SERVERS) if round_index % 2 == 0 else list(reversed(SERVERS))
                for clients in args.clients:
                    for name in order:
                        sample = measure(urls[name], clients, args.requests, workload, args.long_tokens, args.long_every)
                        samples[name, clients].append(sample)
                        print(json.dumps({"round": round_index, "server": name, "clients": clients, **sample}), flush=True)
    figures = ("requests_per_second", "ttft_p50", "ttft_p95", "latency_p50", "latency_p95")
    rows = []
    for (name, clients), runs in samples.items():
        quiet = [run for run in runs if not run["noisy"]] or runs
        rows.append(
            {
                "server": name,
                "clients": clients,
                **{figure: statistics.median(run[figure] for run in quiet) for figure in figures},
                "samples": len(runs),
                "noisy_samples": sum(run["noisy"] for run in runs),
                "loads": [run["load"] for run in runs],
            }
        )
    header = (
        "| server | clients | requests/s | first token p50 (s) | first token p95 (s) | latency p50 (s) | latency p95 (s) | samples (noisy) | other load per sample |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {row['server']} | {row['clients']} | " + " | ".join(f"{row[figure]:.3g}" if figure == "requests_per_second" else f"{row[figure]:.2f}" for figure in figures)
        + f" | {row['samples']} ({row['noisy_samples']}) | {'; '.join(row['loads'])} |"
        for row in rows
    ]
    table = "\n".join([header, *lines])
    by_key = {(row["server"], row["clients"]): row for row in rows}
    # Continuous batching over micro-batching, at each client count. With the same rows and step cost, a
    # micro-batch runs --long-tokens steps for every --max-batch-size requests, continuous batching for
    # every --max-batch-size long answers: its requests/s can be at most --long-every times as many.
    versus = {
        clients: {
            "requests_per_second": by_key["continuous", clients]["requests_per_second"] / by_key["micro-batching", clients]["requests_per_second"],
            "ttft_p95": by_key["continuous", clients]["ttft_p95"] / by_key["micro-batching", clients]["ttft_p95"],
        }
        for clients in args.clients
    }
    comparison = "\n".join(
        f"{clients} clients: continuous {ratio['requests_per_second']:.2f}x micro-batching's requests/s, "
        f"{ratio['ttft_p95']:.2f}x its p95 first token"
        for clients, ratio in versus.items()
    )
    settings = {
        "shape": args.shape,
        "layers": args.layers,
        "rounds": args.rounds,
        "requests_per_client": args.requests,
        "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens,
        "long_every": args.long_every,
        "eos_token_id": workload["eos_token_id"],
        "short_answers": workload["short"],
        "long_answers": workload["long"],
        "max_batch_size": args.max_batch_size,
        "threads": torch.get_num_threads(),
        "measured_on": setup(),
    }
    print(f"\n{settings}\nMedians over the quiet samples (all samples where none was quiet).\n{table}\n{comparison}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        results = {"settings": settings, "rows": rows, "markdown": table, "continuous_over_micro_batching": versus}
        Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
