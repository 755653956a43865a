"""The streaming side of flaminko serve, and its micro-batching scheduler.

`RowStreamer` is one request's stream whichever scheduler runs it: its tokens decoded incrementally,
`stop` cut from its text, and its admission ticket told of every token and of the end.

`MicroBatchingManager` is the scheduler for the language models continuous batching refuses (those
that place positions by cache column, as MPT's ALiBi does: `ContinuousBatcher` needs a static cache
whose rows keep their own positions). One worker thread collects the queued requests and answers those
with the same generation settings in one left-padded `generate` batch (a sample's tokens do not depend
on its batch), streaming each row to its own client; the batch runs until its last row ends. A seeded
sampled request runs alone, so its answer is the same under any load.
"""

import asyncio
import contextvars
import copy
import queue
import threading
import time
from dataclasses import dataclass, field

# How long the micro-batching worker waits for more requests to join the first one of a batch.
BATCH_WINDOW_S = 0.01

# The request's admission ticket (its seed, its timing), from the handler to the generation manager
# (both run in the request's task).
REQUEST_TICKET: contextvars.ContextVar = contextvars.ContextVar("flaminko_request_ticket")


class GenerationFailed(Exception):
    """Generation of a non-streamed answer failed (answered as a 500)."""


@dataclass
class _Job:
    """One request waiting for, or in, a generate batch."""

    model: object
    inputs: dict
    generation_config: object
    seed: int | None
    streamer: object
    pad_token_id: int | None = None
    tokens: list = field(default_factory=list)
    done: bool = False

    @property
    def batch_key(self):
        """Requests with equal keys run in one batch: the same settings and image layout. A seeded
        sampled request runs alone, so its answer does not depend on the others."""
        config = self.generation_config
        if config.do_sample and self.seed is not None:
            return id(self)
        pixel_values = self.inputs.get("pixel_values")
        layout = None if pixel_values is None else (tuple(pixel_values.shape[2:]), pixel_values.dtype)
        return id(self.model), config.to_json_string(use_diff=False), layout


class _BatchFinished(Exception):
    """Raised from the batch streamer to end generate once every row has ended."""


class _RowCancelled(Exception):
    """Raised from a row's streamer once its client has gone, to end that row."""


def batching_classes(stream_error):
    """The per-request streamer and the micro-batching generation manager (`stream_error`: the item that
    ends a stream with an error in transformers' chat-completion handler, as the adapter gives it)."""

    class RowStreamer:
        """One request's stream, as transformers' handler reads it (a queue of text ending in None, and
        `total_tokens`, `cancel`): its tokens decoded incrementally (the Rust tokenizer's DecodeStream)
        and queued on the event loop, the text cut at the first `stop` string: text that could begin a
        stop string is held back until it is known not to. `on_cancel` is called when the handler
        cancels it (its client has gone); the request's `ticket` is closed at the stream's end."""

        def __init__(self, tokenizer, loop, text_queue, ticket, stop=None, on_cancel=None):
            from tokenizers.decoders import DecodeStream

            self._tokenizer, self._loop, self._queue = tokenizer, loop, text_queue
            self._ticket, self._on_cancel = ticket, on_cancel
            self._decode_stream = DecodeStream([], skip_special_tokens=True)
            self._cancelled = threading.Event()
            self._prompt = True
            self.total_tokens = 0
            self.stop = [stop] if isinstance(stop, str) else list(stop or [])
            self.stopped = False
            self._held = ""
            self._received = ""

        def put(self, value) -> None:
            """The prompt first (skipped), then the row's new tokens."""
            if self._cancelled.is_set():
                raise _RowCancelled
            if self._prompt:
                self._prompt = False
                return
            for token_id in value.tolist():
                self.add(token_id)

        def add(self, token_id: int) -> None:
            """One new token of the answer."""
            self.total_tokens += 1
            self._ticket.token()
            text = self._decode_stream.step(self._tokenizer, token_id)
            if text is not None:
                self._send(text)

        def cancel(self) -> None:
            """The client has gone (or the handler is done with the stream): the row ends at its next token."""
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel()

        def end(self) -> None:
            self._send(None)

        def finish(self, token_ids: list) -> None:
            """Ends the stream; the incremental decoder keeps back bytes that do not yet form a
            character, so what the whole answer decodes to beyond the text sent is sent first."""
            whole = self._tokenizer.decode(token_ids, skip_special_tokens=True)
            if not self.stopped and whole.startswith(self._received) and len(whole) > len(self._received):
                self._send(whole[len(self._received) :])
            self._ticket.close()  # before the end reaches the client, who may count on its place being free
            self.end()

        def fail(self, message: str) -> None:
            """Ends the stream with an error (generation failed)."""
            self._ticket.close()
            self._enqueue(stream_error(message))
            self._enqueue(None)

        def _enqueue(self, item) -> None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

        def _send(self, item) -> None:
            if item is None:  # the end of the stream
                if self._held and not self.stopped:
                    self._enqueue(self._held)
                self._held = ""
                self._enqueue(None)
                return
            if self.stopped:
                return
            self._received += item
            text = self._held + item
            cuts = [text.find(stop) for stop in self.stop if stop in text]
            if cuts:
                self.stopped = True
                self._held = ""
                if min(cuts):
                    self._enqueue(text[: min(cuts)])
                return
            keep = max((len(stop) - 1 for stop in self.stop), default=0)
            ready, self._held = (text[: len(text) - keep], text[len(text) - keep :]) if keep else (text, "")
            if ready:
                self._enqueue(ready)

    class BatchStreamer:
        """What generate streams to: hands each row's new token to its request's streamer, and
        ends generation when every row has ended (end of turn, stop string, client gone)."""

        def __init__(self, jobs, eos_token_ids):
            self.jobs = jobs
            self.eos_token_ids = set(eos_token_ids)
            self._prompt = True

        def put(self, value) -> None:
            if self._prompt:  # generate's first put is the prompt
                self._prompt = False
                return
            for job, token in zip(self.jobs, value.tolist()):
                if job.done:
                    continue
                if token in self.eos_token_ids:
                    job.done = True
                    continue
                job.tokens.append(token)
                try:
                    job.streamer.put(value.new_tensor([token]))
                except _RowCancelled:
                    job.done = True
                job.done = job.done or job.streamer.stopped
            if all(job.done for job in self.jobs):
                raise _BatchFinished

        def end(self) -> None:
            for job in self.jobs:
                job.streamer.finish(job.tokens)

    class MicroBatchingManager:
        """The generation manager the handler's responses call (on transformers 5.25 through the
        adapter's engine): one worker thread runs queued requests with the same settings in one
        generate batch (up to max_batch_size rows)."""

        def __init__(self, max_batch_size: int):
            self.max_batch_size = max_batch_size
            self.running = 0  # rows of the generate batch running now
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="flaminko-generate", daemon=True)
            self._thread.start()

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            text_queue, job = self._submit(model, processor, inputs, gen_config)
            return text_queue, job.streamer

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            text_queue, job = self._submit(model, processor, inputs, gen_config)
            parts = []
            while (item := await text_queue.get()) is not None:
                if isinstance(item, stream_error):
                    raise GenerationFailed(f"generation failed: {item.msg}")
                parts.append(item)
            return "".join(parts), inputs["input_ids"].shape[-1], job.tokens

        def _submit(self, model, processor, inputs, gen_config):
            ticket = REQUEST_TICKET.get()
            text_queue = asyncio.Queue()
            tokenizer = getattr(processor, "tokenizer", processor)
            streamer = RowStreamer(tokenizer._tokenizer, asyncio.get_running_loop(), text_queue, ticket, stop=gen_config.stop_strings)
            job = _Job(model, dict(inputs), gen_config, ticket.seed, streamer, pad_token_id=tokenizer.pad_token_id)
            self._queue.put(job)
            ticket.taken = True
            return text_queue, job

        def stop(self) -> None:
            pass  # the worker is a daemon thread

        def _run(self) -> None:
            waiting = []
            while True:
                if not waiting:
                    waiting.append(self._queue.get())
                    time.sleep(BATCH_WINDOW_S)
                while True:
                    try:
                        waiting.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                key = waiting[0].batch_key
                batch = [job for job in waiting if job.batch_key == key][: self.max_batch_size]
                waiting = [job for job in waiting if not any(job is chosen for chosen in batch)]
                self._generate(batch)

        def _generate(self, jobs) -> None:
            import torch

            jobs = [job for job in jobs if self._started(job)]
            if not jobs:
                return
            self.running = len(jobs)
            model, config = jobs[0].model, copy.deepcopy(jobs[0].generation_config)
            config.stop_strings = None  # stop strings are cut per row by RowStreamer
            eos = config.eos_token_id
            streamer = BatchStreamer(jobs, [] if eos is None else [eos] if isinstance(eos, int) else eos)
            try:
                if jobs[0].seed is not None:
                    torch.manual_seed(jobs[0].seed)
                batch = collate([job.inputs for job in jobs], jobs[0].pad_token_id or 0)
                model.generate(**batch, generation_config=config, streamer=streamer)
            except _BatchFinished:
                streamer.end()
            except Exception as error:  # reported to every client of the batch, the worker goes on
                for job in jobs:
                    job.streamer.fail(" ".join(str(error).split()))
            finally:
                self.running = 0

        @staticmethod
        def _started(job) -> bool:
            """Hands the prompt to the row's streamer; False (its stream ended) when its client has already gone."""
            try:
                job.streamer.put(job.inputs["input_ids"])
            except _RowCancelled:
                job.streamer.finish([])
                return False
            return True

    return RowStreamer, MicroBatchingManager


def collate(inputs: list[dict], pad_token_id: int) -> dict:
    """One generate batch from single-request inputs: prompts left-padded, images padded with blank
    ones up to the most any request has (a row never attends to images beyond its own `<image>`s)."""
    if len(inputs) == 1:
        return inputs[0]
    first = inputs[0]["input_ids"]
    length = max(item["input_ids"].shape[-1] for item in inputs)
    input_ids = first.new_full((len(inputs), length), pad_token_id)
    attention_mask = first.new_zeros((len(inputs), length))
    for row, item in enumerate(inputs):
        size = item["input_ids"].shape[-1]
        input_ids[row, length - size :] = item["input_ids"][0]
        attention_mask[row, length - size :] = item["attention_mask"][0]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    images = [item.get("pixel_values") for item in inputs]
    if any(pixels is not None for pixels in images):
        sample = next(pixels for pixels in images if pixels is not None)
        most = max(pixels.shape[1] for pixels in images if pixels is not None)
        pixel_values = sample.new_zeros((len(inputs), most, *sample.shape[2:]))
        for row, pixels in enumerate(images):
            if pixels is not None:
                pixel_values[row, : pixels.shape[1]] = pixels[0]
        batch["pixel_values"] = pixel_values
    return batch

