"""`flaminko caption` and `flaminko chat`: a Flaminko folder or Hub id, images, generated text."""

import sys

from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

from .processing_flaminko import load_image

CHAT_HELP = "Type a message; '/image PATH' attaches an image to your next message, '/reset' starts over, '/quit' ends."


def load(model_name_or_path):
    """Model (eval mode) and processor; `import flaminko` has registered the classes, so no remote code runs."""
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path).eval()
    return model, AutoProcessor.from_pretrained(model_name_or_path)


def caption(model_name_or_path, images, prompt: str = "<image>", max_new_tokens: int = 20, num_beams: int = 3):
    """One caption per image (paths or PIL images) from a Flaminko folder or Hub id."""
    model, processor = load(model_name_or_path)
    return generate_captions(model, processor, images, prompt, max_new_tokens, num_beams)


def generate_captions(
    model, processor, images, prompt: str = "<image>", max_new_tokens: int = 20, num_beams: int = 3, batch_size: int = 16
) -> list[str]:
    """One caption per image, in batches; the prompt must hold one `<image>`."""
    if prompt.count("<image>") != 1:
        raise ValueError(f"The prompt must hold exactly one <image>, got {prompt!r}")
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = [load_image(image) for image in images[start : start + batch_size]]
        batch = processor(text=[prompt] * len(chunk), images=[[image] for image in chunk])
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        captions += [text.strip() for text in processor.batch_decode(out[:, batch["input_ids"].shape[1] :])]
    return captions


def chat(model_name_or_path, lines=None, max_new_tokens: int = 64):
    """An image-text conversation on standard input, answers streamed as they are generated."""
    model, processor = load(model_name_or_path)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages, images, pending = [], [], []
    print(CHAT_HELP, flush=True)
    for line in lines if lines is not None else sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            messages, images, pending = [], [], []
            print("(conversation reset)", flush=True)
            continue
        if line.startswith("/image "):
            try:
                pending.append(load_image(line.removeprefix("/image ").strip()))
            except ValueError as error:
                print(f"error: {error}", flush=True)
                continue
            print(f"(image {len(images) + len(pending)} attached)", flush=True)
            continue
        content = [{"type": "image"} for _ in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content})
        images, pending = images + pending, []
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = processor(text=prompt, images=images or None)
        print("Assistant:", end=" ", flush=True)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
        answer = processor.decode(out[0, batch["input_ids"].shape[1] :]).strip()
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
