"""`flaminko serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`) built on
transformers' own serving stack (`transformers serve`: its FastAPI app, chat-completion handler,
request/response schemas and streamer), with the few pieces that cannot serve Flaminko replaced:

- loading: transformers looks the class up as `getattr(transformers, config.architectures[0])`; here
  it goes through `AutoModelForImageTextToText`, where `register_auto_classes()` put Flaminko;
- modality: transformers decides it from its built-in name tables; Flaminko is a VLM;
- images: `image_url` parts (data URLs, local paths, `file://` and http(s) URLs) are decoded here with
  the processor's own `load_image`, so an undecodable image is a 400 naming the message and part;
- generation: one worker thread collects the queued requests and answers those with the same
  generation settings in one left-padded `generate` batch (a sample's tokens do not depend on its
  batch), streaming each row to its own client; `stop` ends a row and is cut from its text; `seed`
  seeds a request alone, so a seeded sampled answer is the same under any load;
- errors come back in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`).

The prompt is the model folder's chat template, as `flaminko chat` uses it.
transformers' serving internals are not a public API: SERVING_TRANSFORMERS is the range this was
tested with (setup.cfg's `serve` extra), and a stack that changed ends in one clear ImportError.
"""

import base64
import binascii
import contextvars
import copy
import io
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

SERVING_TRANSFORMERS = ">=5.23,<5.24"
INSTALL_HINT = "pip install 'flaminko[serve]'"
# Routes of transformers' app that Flaminko serves; the others (legacy completions, responses,
# audio, model loading and unloading by any client) are taken off.
SERVED_ROUTES = ("/v1/chat/completions", "/v1/models", "/health")
DEFAULT_MAX_BATCH_SIZE = 8
# How long the worker waits for more requests to join the first one of a batch.
DEFAULT_BATCH_WINDOW_MS = 10

# The request's `seed`, from the handler to the generation worker (both run in the request's task).
_REQUEST_SEED: contextvars.ContextVar = contextvars.ContextVar("flaminko_request_seed", default=None)


def is_tested_transformers() -> bool:
    """Whether the installed transformers is in the range flaminko serve was tested with."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    return SpecifierSet(SERVING_TRANSFORMERS).contains(version("transformers"))


def _serving_stack():
    """transformers' serving pieces this module builds on, or one ImportError saying what to do."""
    from importlib.metadata import version

    try:
        import fastapi  # noqa: F401
        import openai  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(f"flaminko serve needs FastAPI, uvicorn and openai ({error.name} is missing): {INSTALL_HINT}") from error
    try:
        from transformers.cli.serving import chat_completion, model_manager, server, utils

        for module, names in (
            (chat_completion, ("ChatCompletionHandler",)),
            (model_manager, ("ModelManager",)),
            (server, ("build_server",)),
            (utils, ("BaseGenerateManager", "DirectStreamer", "GenerationState", "Modality", "_GenerationCancelled", "_StreamError")),
        ):
            for name in names:
                getattr(module, name)
        for owner, method in (
            (chat_completion.ChatCompletionHandler, "_build_generation_config"),
            (chat_completion.ChatCompletionHandler, "_resolve_model"),
            (chat_completion.ChatCompletionHandler, "get_processor_inputs_from_messages"),
            (model_manager.ModelManager, "_load_model"),
            (utils.DirectStreamer, "_enqueue"),
        ):
            getattr(owner, method)
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"transformers {version('transformers')} has changed the serving stack flaminko serve builds on "
            f"({error}); flaminko serve was tested with transformers{SERVING_TRANSFORMERS}: {INSTALL_HINT}"
        ) from error
    if not is_tested_transformers():
        warnings.warn(
            f"flaminko serve was tested with transformers{SERVING_TRANSFORMERS}, this is {version('transformers')}: "
            f"if a request fails inside transformers, {INSTALL_HINT}",
            stacklevel=3,
        )
    return chat_completion, model_manager, server, utils


class RequestError(Exception):
    """A bad request, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def decode_image_url(url: str):
    """A PIL image from an `image_url`: a data URL (base64), a local path or `file://` URL, or an
    http(s) URL (fetched by transformers' `load_image`)."""
    from PIL import Image

    from .processing_flaminko import decode_image_file, load_image

    if not isinstance(url, str) or not url:
        raise ValueError("an image_url needs a non-empty `url` string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data URL image must be base64-encoded (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"the data URL is not valid base64: {error}") from error
        try:
            image = decode_image_file(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"refusing the data URL's image: {error}") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"the data URL holds no decodable image: {error}") from error
        return load_image(image)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        from transformers.image_utils import load_image as fetch_image

        try:
            return load_image(fetch_image(url, timeout=10))
        except Exception as error:  # any failure to fetch or decode is the client's URL
            raise ValueError(f"cannot fetch an image from {url}: {error}") from error
    path = unquote(urlparse(url).path) if scheme == "file" else url
    if not os.path.isfile(path):
        raise ValueError(f"{url}: no such image file on the server (give a data URL, a local path or an http(s) URL)")
    return load_image(path)


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


def _stack_class(utils):
    """The per-request streamer and the batching generation manager, on transformers' classes."""
    import asyncio

    class RowStreamer(utils.DirectStreamer):
        """transformers' streamer for one request, cutting the text at the first `stop` string: text
        that could begin a stop string is held back until it is known not to."""

        def __init__(self, *args, stop=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.stop = [stop] if isinstance(stop, str) else list(stop or [])
            self.stopped = False
            self._held = ""
            self._received = ""

        def finish(self, token_ids: list) -> None:
            """Ends the stream; the incremental decoder keeps back bytes that do not yet form a
            character, so what the whole answer decodes to beyond the text sent is sent first."""
            whole = self._tokenizer.decode(token_ids, skip_special_tokens=True)
            if not self.stopped and whole.startswith(self._received) and len(whole) > len(self._received):
                self._enqueue(whole[len(self._received) :])
            self.end()

        def fail(self, message: str) -> None:
            """Ends the stream with an error (generation failed)."""
            super()._enqueue(utils._StreamError(message))
            super()._enqueue(None)

        def _enqueue(self, item) -> None:
            if item is None:  # the end of the stream
                if self._held and not self.stopped:
                    super()._enqueue(self._held)
                self._held = ""
                super()._enqueue(None)
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
                    super()._enqueue(text[: min(cuts)])
                return
            keep = max((len(stop) - 1 for stop in self.stop), default=0)
            ready, self._held = (text[: len(text) - keep], text[len(text) - keep :]) if keep else (text, "")
            if ready:
                super()._enqueue(ready)

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
                except utils._GenerationCancelled:
                    job.done = True
                job.done = job.done or job.streamer.stopped
            if all(job.done for job in self.jobs):
                raise _BatchFinished

        def end(self) -> None:
            for job in self.jobs:
                job.streamer.finish(job.tokens)

    class BatchingGenerateManager(utils.BaseGenerateManager):
        """transformers' generation-manager interface over one worker thread that runs queued
        requests with the same settings in one generate batch (up to max_batch_size rows)."""

        def __init__(self, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS):
            self.max_batch_size = max_batch_size
            self.batch_window = batch_window_ms / 1000
            self.batch_sizes = []  # every batch's size, in order (for tests and benchmarks)
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
                if isinstance(item, utils._StreamError):
                    raise RequestError(500, f"generation failed: {item.msg}")
                parts.append(item)
            return "".join(parts), inputs["input_ids"].shape[-1], job.tokens

        def _submit(self, model, processor, inputs, gen_config):
            text_queue = asyncio.Queue()
            tokenizer = getattr(processor, "tokenizer", processor)
            streamer = RowStreamer(tokenizer._tokenizer, asyncio.get_running_loop(), text_queue, stop=gen_config.stop_strings)
            job = _Job(model, dict(inputs), gen_config, _REQUEST_SEED.get(), streamer, pad_token_id=tokenizer.pad_token_id)
            self._queue.put(job)
            return text_queue, job

        def stop(self) -> None:
            pass  # the worker is a daemon thread

        def _run(self) -> None:
            waiting = []
            while True:
                if not waiting:
                    waiting.append(self._queue.get())
                    time.sleep(self.batch_window)
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
            self.batch_sizes.append(len(jobs))
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

        @staticmethod
        def _started(job) -> bool:
            """Hands the prompt to the row's streamer; False when its client has already gone."""
            try:
                job.streamer.put(job.inputs["input_ids"])
            except utils._GenerationCancelled:
                return False
            return True

    return RowStreamer, BatchingGenerateManager


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


def build_app(
    model: str,
    *,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
    log_level: str = "warning",
):
    """transformers' serving app for a Flaminko folder or Hub id (loaded now, kept loaded)."""
    from transformers.utils import logging

    from .hub import check_model_source
    from .inference import resolve_device

    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if batch_window_ms < 0:
        raise ValueError(f"--batch-window-ms must be at least 0, got {batch_window_ms}")
    check_model_source(model, option="MODEL")
    device = resolve_device(device)
    chat_completion, model_manager, server, utils = _serving_stack()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from . import register_auto_classes
    from .modeling_flaminko import FlaminkoForConditionalGeneration

    register_auto_classes()
    # transformers' serving modules log every request and every load as a warning: they speak at
    # info and below.
    serving_level = log_level if log_level in ("debug", "info") else "error"
    logging.get_logger("transformers.cli.serving").setLevel(logging.log_levels[serving_level])
    served_name = served_model_name or model
    _, manager_class = _stack_class(utils)

    class FlaminkoModelManager(model_manager.ModelManager):
        """Loads through the Auto classes and knows Flaminko is a VLM; lists the one served model."""

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            from transformers import AutoModelForImageTextToText

            model_id, revision = model_id_and_revision.rsplit("@", 1)
            loaded = AutoModelForImageTextToText.from_pretrained(model_id, revision=revision, dtype=self.dtype)
            return loaded.to(self.device).eval()

        @staticmethod
        def get_model_modality(model, processor=None):
            if isinstance(model, FlaminkoForConditionalGeneration):
                return utils.Modality.VLM
            return model_manager.ModelManager.get_model_modality(model, processor=processor)

        def get_gen_models(self, cache_dir=None) -> list[dict]:
            return [{"id": served_name, "object": "model", "created": int(self.created), "owned_by": "flaminko"}]

    class FlaminkoChatCompletionHandler(chat_completion.ChatCompletionHandler):
        """transformers' handler; the request's images, settings and model name are checked here."""

        async def handle_request(self, body, request_id):
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise RequestError(400, "`messages` must be a non-empty list of messages", param="messages")
            _REQUEST_SEED.set(_seed(body.pop("seed", None)))
            try:
                return await super().handle_request(body, request_id)
            except (ValueError, TypeError) as error:
                raise RequestError(400, " ".join(str(error).split()), param="messages") from error
            except KeyError as error:
                raise RequestError(400, f"a message or content part lacks the field {error}", param="messages") from error

        def _resolve_model(self, body):
            requested = body.get("model")
            if requested not in (served_name, model):
                raise RequestError(
                    404, f"The model `{requested}` does not exist: this server serves `{served_name}`", param="model", code="model_not_found"
                )
            loaded, processor = self.model_manager.load_model_and_processor(self.model_manager.process_model_name(model))
            return served_name, loaded, processor

        def _build_generation_config(self, body, model_generation_config, use_cb=False):
            _check_sampling(body)
            config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            temperature, top_p = body.get("temperature"), body.get("top_p")
            if temperature != 0 and ((temperature is not None and temperature > 0) or (top_p is not None and top_p < 1)):
                config.do_sample = True  # OpenAI's temperature > 0 samples; transformers' keeps the model's default
            if not config.do_sample:  # greedy: sampling settings would only be warned about
                config.temperature = config.top_p = None
            return config

        @staticmethod
        def get_processor_inputs_from_messages(messages, modality):
            converted = chat_completion.ChatCompletionHandler.get_processor_inputs_from_messages(messages, modality)
            for index, message in enumerate(converted):
                for part in message["content"]:
                    if part.get("type") == "image":
                        try:
                            part["image"] = decode_image_url(part.pop("url"))
                        except (ValueError, TypeError) as error:
                            raise RequestError(400, f"messages[{index}]: {error}", param="messages", code="invalid_image") from error
            return converted

    class FlaminkoGenerationState(utils.GenerationState):
        """One batching manager for the served model."""

        def __init__(self):
            super().__init__()
            self.manager = manager_class(max_batch_size=max_batch_size, batch_window_ms=batch_window_ms)

        def get_manager(self, model_id, use_cb=False):
            return self.manager

    models = FlaminkoModelManager(device=device, dtype=dtype, model_timeout=-1, force_model=model)
    models.created = time.time()
    generation_state = FlaminkoGenerationState()
    handler = FlaminkoChatCompletionHandler(model_manager=models, generation_state=generation_state)
    app = server.build_server(models, handler, None, None, None, None, generation_state=generation_state)
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) in SERVED_ROUTES]
    app.state.generation_state = generation_state

    async def request_error(request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(request, error: HTTPException):
        code = "model_not_found" if error.status_code == 404 and request.url.path == "/v1/chat/completions" else None
        return JSONResponse(RequestError(error.status_code, str(error.detail), code=code).body(), status_code=error.status_code)

    async def validation_error(request, error: RequestValidationError):
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse(RequestError(400, message).body(), status_code=400)

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


def _seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"`seed` must be an integer, got {seed!r}", param="seed")
    return seed


def _check_sampling(body: dict) -> None:
    """The generation settings of a request, checked once before it is queued."""

    def number(name, low, high, *, low_open=False, integer=False):
        value = body.get(name)
        if value is None:
            return
        kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        in_range = kind_ok and not isinstance(value, bool) and (value > low if low_open else value >= low) and value <= high
        if not in_range:
            bounds = f"{'(' if low_open else '['}{low}, {high}]"
            raise RequestError(400, f"`{name}` must be {'an integer' if integer else 'a number'} in {bounds}, got {value!r}", param=name)

    number("temperature", 0, 2)
    number("top_p", 0, 1, low_open=True)
    number("max_tokens", 1, 1 << 20, integer=True)
    number("max_completion_tokens", 1, 1 << 20, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, list) and 0 < len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)):
        raise RequestError(400, f"`stop` must be a non-empty string or a list of 1 to 4 of them, got {stop!r}", param="stop")


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", **options) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    app = build_app(model, log_level=log_level, **options)
    print(f"Serving {options.get('served_model_name') or model} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


class BackgroundServer:
    """The server in a thread of this process (tests, benchmarks): `with BackgroundServer(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, name="flaminko-serve", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self._thread.join(timeout=10)
        return False
