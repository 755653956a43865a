"""`flaminko caption` and `flaminko chat`: a Flaminko folder or Hub id, images, generated text."""

import glob
import json
import os
import sys
from pathlib import Path

from .data import CAPTION_CHAT_TEMPLATE, IMAGE_SUFFIXES
from .processing_flaminko import IMAGE_TOKEN, load_image

CHAT_HELP = (
    "Type a message; '/image PATH' attaches an image to your next message, '/reset' starts over, "
    "'/quit' (or Ctrl-D) ends."
)
CAPTION_CHAT_HINT = (
    "This model was trained on image-text pairs: attach an image and press Enter for its caption; "
    "text you type is the beginning of the answer."
)
OUTPUT_FORMATS = (".tsv", ".jsonl")


def expand_images(patterns: list[str]) -> list[str]:
    """Image paths from files, folders (their images, sorted, not recursive) and glob patterns."""
    images = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower().lstrip(".") in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{pattern}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif os.path.isfile(pattern):
            images.append(pattern)
        else:
            found = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
            if not found:
                raise FileNotFoundError(f"{pattern}: no such file or folder, and no file matches it as a glob")
            images += found
    return images


def resolve_device(device: str | None) -> str:
    """The device asked for, checked; default cuda when there is one, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"--device {device}: not a device name (cpu, cuda, cuda:1, mps...)") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: no MPS device here; use --device cpu")
    return device


def load(model_name_or_path, *, device: str | None = None, dtype: str = "auto"):
    """Model (eval mode, on the device) and processor from a Flaminko folder or Hub id, checked first.
    The Flaminko classes are registered with the Auto classes, so no remote code runs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import register_auto_classes
    from .hub import check_model_source

    device = resolve_device(device)
    check_model_source(model_name_or_path, option="--model")
    register_auto_classes()
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_name_or_path)


def caption(model_name_or_path, images, prompt: str = "<image>", max_new_tokens: int = 20, num_beams: int = 3, **options):
    """One caption per image (paths or PIL images) from a Flaminko folder or Hub id."""
    model, processor = load(model_name_or_path, device=options.pop("device", None), dtype=options.pop("dtype", "auto"))
    return generate_captions(model, processor, images, prompt, max_new_tokens, num_beams, **options)


def generate_captions(
    model,
    processor,
    images,
    prompt: str = "<image>",
    max_new_tokens: int = 20,
    num_beams: int = 3,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """One caption per image, in batches; the prompt must hold one `<image>`."""
    from tqdm.auto import tqdm

    if prompt.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"The prompt must hold exactly one {IMAGE_TOKEN}, got {prompt!r}")
    for name, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    captions = []
    with tqdm(total=len(images), desc="captioning", unit="image", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = [load_image(image) for image in images[start : start + batch_size]]
            batch = processor(text=[prompt] * len(chunk), images=[[image] for image in chunk]).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            captions += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.update(len(chunk))
    return captions


def caption_to_file(model_name_or_path, images: list[str], *, output: str | None = None, **options):
    """`flaminko caption`: captions as TSV lines (path, caption) on standard output, or in a .tsv or
    .jsonl file; checked before the model is loaded."""
    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--output {output}: give a .tsv or .jsonl file")
    if options.get("prompt", IMAGE_TOKEN).count(IMAGE_TOKEN) != 1:
        raise ValueError(f"--prompt must hold exactly one {IMAGE_TOKEN}, got {options['prompt']!r}")
    captions = caption(model_name_or_path, images, progress=True, **options)
    if output is None:
        for path, text in zip(images, captions):
            print(f"{path}\t{' '.join(text.split())}")
        return captions
    with open(output, "w", encoding="utf-8") as handle:
        if output.lower().endswith(".jsonl"):
            handle.writelines(json.dumps({"image": p, "caption": t}, ensure_ascii=False) + "\n" for p, t in zip(images, captions))
        else:
            handle.write("image\tcaption\n")
            handle.writelines(f"{p}\t{' '.join(t.split())}\n" for p, t in zip(images, captions))
    print(f"{len(captions)} captions written to {output}", file=sys.stderr)
    return captions


def read_lines(prompt: str = "> "):
    """Lines typed at the prompt (the prompt shows on a terminal only); ends at end of input."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            yield input(prompt if interactive else "")
        except EOFError:
            if interactive:
                print()
            return


def chat(model_name_or_path, lines=None, max_new_tokens: int = 64, device: str | None = None, dtype: str = "auto"):
    """An image-text conversation on standard input, answers streamed as they are generated, in the
    prompt format the model folder records (its chat template)."""
    from transformers import TextStreamer

    model, processor = load(model_name_or_path, device=device, dtype=dtype)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages, images, pending = [], [], []
    print(CHAT_HELP, flush=True)
    if processor.chat_template == CAPTION_CHAT_TEMPLATE:
        print(CAPTION_CHAT_HINT, flush=True)
    for line in lines if lines is not None else read_lines():
        line = line.strip()
        if not line and not pending:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            messages, images, pending = [], [], []
            print("(conversation reset)", flush=True)
            continue
        if line.startswith("/image"):
            try:
                pending.append(load_image(line.removeprefix("/image").strip()))
            except (ValueError, OSError) as error:
                print(f"error: {error}", flush=True)
                continue
            print(f"(image {len(images) + len(pending)} attached; press Enter or type a message)", flush=True)
            continue
        content = [{"type": "image"} for _ in pending] + ([{"type": "text", "text": line}] if line else [])
        messages.append({"role": "user", "content": content})
        images, pending = images + pending, []
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = processor(text=prompt, images=images or None).to(model.device)
        print("Assistant:", end=" ", flush=True)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
        answer = processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        if not answer:
            print("(no answer: the model ended its turn at once)", flush=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
