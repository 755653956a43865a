"""flaminko serve's scheduler: continuous batching (`continuous.ContinuousBatcher`) behind the generation
manager interface transformers' chat-completion handler calls.

A request is submitted to the batcher from the event loop (its settings prepared there, cheaply); one
worker thread sleeps until a request arrives, then calls `step()` until nothing runs or waits. Each
row's tokens stream through its `RowStreamer` as they come (the EOS that ends an answer is not sent);
a `stop` string or a client that leaves cancels the row, which frees its slot at the next step."""

import asyncio
import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .batching import REQUEST_TICKET, GenerationFailed
from .continuous import Answer, ContinuousBatcher, Request


@dataclass(eq=False)
class _Open:
    """A submitted request whose stream has not ended."""

    answer: Answer | None  # None until the batcher has it
    streamer: object
    tokens: list = field(default_factory=list)  # the answer's token ids, its EOS left out


class ContinuousGenerateManager:
    """Answers the handler's requests by continuous batching. `new_batcher()` makes the batcher; should a
    step fail, every open request ends in that error and a fresh batcher takes over, so that no state
    of the failed step outlives it."""

    def __init__(self, new_batcher: Callable[[], ContinuousBatcher], streamer_class, stream_error):
        self._new_batcher = new_batcher
        self.batcher = new_batcher()
        self._streamer_class, self._stream_error = streamer_class, stream_error
        self._open: list[_Open] = []
        # Held while a request is submitted and while the batcher is replaced, so that every open
        # request is in the batcher that steps.
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flaminko-generate", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return self.batcher.running

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        text_queue, entry = self._submit(processor, inputs, gen_config)
        return text_queue, entry.streamer

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        text_queue, entry = self._submit(processor, inputs, gen_config)
        parts = []
        try:
            while (item := await text_queue.get()) is not None:
                if isinstance(item, self._stream_error):
                    raise GenerationFailed(f"generation failed: {item.msg}")
                parts.append(item)
        except asyncio.CancelledError:  # the client has gone: its slot is freed at the next step
            entry.answer.cancel()
            raise
        return "".join(parts), inputs["input_ids"].shape[-1], entry.tokens

    def _submit(self, processor, inputs, gen_config):
        ticket = REQUEST_TICKET.get()
        tokenizer = getattr(processor, "tokenizer", processor)
        config = copy.deepcopy(gen_config)
        config.stop_strings = None  # cut from the text by the row's streamer
        eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id or ())
        text_queue = asyncio.Queue()
        entry = _Open(answer=None, streamer=None)
        entry.streamer = self._streamer_class(
            tokenizer._tokenizer,
            asyncio.get_running_loop(),
            text_queue,
            ticket,
            stop=gen_config.stop_strings,
            on_cancel=lambda: entry.answer.cancel(),
        )

        def on_token(token: int) -> None:
            if token in eos:
                return
            entry.tokens.append(token)
            entry.streamer.add(token)
            if entry.streamer.stopped:
                entry.answer.cancel()

        request = Request(
            input_ids=inputs["input_ids"],
            pixel_values=inputs.get("pixel_values"),
            generation_config=config,
            seed=ticket.seed,
            on_token=on_token,
        )
        with self._lock:
            entry.answer = self.batcher.submit(request)
            self._open.append(entry)
        ticket.taken = True
        self._arrived.set()
        return text_queue, entry

    def _run(self) -> None:
        while True:
            self._arrived.wait()
            # Cleared before stepping: a request submitted from here on sets it again, and one submitted
            # before is in the batcher's queue, which the steps drain.
            self._arrived.clear()
            try:
                while self.batcher.step():
                    self._end_streams()
                self._end_streams()
            except Exception as error:  # every open request ends in it; the worker goes on
                self._fail_all(" ".join(str(error).split()) or type(error).__name__)

    def _end_streams(self) -> None:
        """Ends the streams of the answers that ended in the last step."""
        with self._lock:
            ended = [entry for entry in self._open if entry.answer.done]
            self._open = [entry for entry in self._open if entry not in ended]
        for entry in ended:
            if entry.answer.finish_reason == "error":
                entry.streamer.fail(entry.answer.error)
            else:
                entry.streamer.finish(entry.tokens)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            failed, self._open = self._open, []
            self.batcher = self._new_batcher()
        for entry in failed:
            entry.streamer.fail(message)
