"""The HTTP side of flaminko serve: the FastAPI app, the checks every request passes once, at the
boundary, before it is queued, and the server's start."""

import asyncio
import functools
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .admission import Admission, Overloaded
from .batching import REQUEST_TICKET, GenerationFailed, batching_classes
from .images import ImageRefused, ImageSources
from .metrics import CONTENT_TYPE

# The running batch: rows, cache columns a row holds (its prompt and answer), images a row may have.
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_TOTAL_TOKENS = 1024
DEFAULT_MAX_IMAGES = 8
# Requests admitted beyond the running batch, waiting for a row (their images being prepared, or queued).
DEFAULT_MAX_QUEUE = 64
SCHEDULERS = ("continuous", "micro-batching")

ROLES = ("system", "user", "assistant")
# Threads that fetch and decode requests' images and make their prompts. asyncio's default pool has
# min(32, cores + 4): on a small machine a few slow image URLs would fill it and hold up the others.
PREPARING_THREADS = 32


class RequestError(Exception):
    """A request refused, answered in OpenAI's error shape (with `headers`, if any)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        if self.status == 429:
            kind = "rate_limit_exceeded"
        else:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def build_app(
    model: str,
    *,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_queue: int = DEFAULT_MAX_QUEUE,
    scheduler: str = "continuous",
    images: ImageSources | None = None,
    log_level: str = "warning",
):
    """The app serving a Flaminko folder or Hub id (loaded now, kept loaded); `images` says where
    request images may come from (default: data URLs and public http(s) URLs).

    The running batch holds up to `max_batch_size` requests of up to `max_total_tokens` tokens (prompt
    and answer) and `max_images` images each; `max_queue` more wait for a row, and beyond them a request
    gets 429. `scheduler`: "continuous" (continuous batching; language models it refuses, such as MPT,
    fall back to micro-batching, said in one log line) or "micro-batching" (queued requests with the
    same settings share one generate batch, which runs until its last row ends: for comparisons)."""
    from transformers.utils import logging as transformers_logging

    from ..inference import load
    from .stack import TransformersServing

    check_options(
        model, max_batch_size=max_batch_size, max_total_tokens=max_total_tokens, max_images=max_images, max_queue=max_queue, scheduler=scheduler
    )
    images = images or ImageSources()
    stack = TransformersServing()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    # transformers' serving modules log every request as a warning: they speak at info and below.
    serving_level = log_level if log_level in ("debug", "info") else "error"
    transformers_logging.get_logger("transformers.cli.serving").setLevel(transformers_logging.log_levels[serving_level])
    served_name = served_model_name or model
    loaded, processor = load(model, device=device, dtype=dtype)
    processor_lock = threading.Lock()  # one tokenizer, shared by the requests' threads
    manager = generation_manager(loaded, stack, scheduler, max_batch_size, max_total_tokens, max_images)
    admission = Admission(max_batch_size=max_batch_size, max_queue=max_queue, running=lambda: manager.running)
    preparing = ThreadPoolExecutor(PREPARING_THREADS, thread_name_prefix="flaminko-prepare")

    def prepare(messages):
        """The prompt's tensors, images fetched and decoded: blocking work, run off the event loop."""
        conversation = []
        for message in messages:
            content = []
            for part in message["content"]:
                if part["type"] == "image":
                    try:
                        content.append({"type": "image", "image": images.load(part["url"])})
                    except ImageRefused as error:
                        raise RequestError(400, f"{part['where']}: {error}", param="messages", code="invalid_image") from None
                else:
                    content.append(part)
            conversation.append({"role": message["role"], "content": content})
        try:
            with processor_lock:
                inputs = processor.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
        except (ValueError, TypeError) as error:
            raise RequestError(400, " ".join(str(error).split()), param="messages") from error
        return inputs.to(loaded.device)

    class ChatCompletionHandler(stack.chat_completion.ChatCompletionHandler):
        """transformers' handler (fields, settings, response shapes); the request is checked here, once."""

        async def handle_request(self, body, request_id):
            self._validate_request(body)
            check_model(body, served_name, model)
            check_settings(body)
            seed = check_seed(body.pop("seed", None))
            messages = check_messages(body.get("messages"))
            check_image_count(messages, max_images)
            try:
                ticket = admission.admit(seed)
            except Overloaded as error:
                raise RequestError(429, str(error), code="rate_limit_exceeded", headers={"Retry-After": str(error.retry_after)}) from None
            try:
                inputs = await asyncio.get_running_loop().run_in_executor(preparing, prepare, messages)
                config = stack.generation_config(self, body, loaded.generation_config, functools.partial(sampling, body))
                fit_to_row(body, inputs["input_ids"].shape[-1], config, max_total_tokens)
                REQUEST_TICKET.set(ticket)
                return await stack.respond(self, request_id, body, loaded, processor, served_name, inputs, config, manager)
            finally:
                if not ticket.taken:  # refused before a generation manager took it
                    ticket.drop()

    handler = ChatCompletionHandler(model_manager=None, generation_state=stack.utils.GenerationState())
    created = int(time.time())
    app = FastAPI()
    if stack.disconnect_middleware is not None:
        app.add_middleware(stack.disconnect_middleware)
    app.state.generation_manager = manager
    app.state.admission = admission

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: dict):
        return await handler.handle_request(body, request.headers.get("X-Request-ID") or str(uuid.uuid4()))

    # Coroutines, so that they never wait for a thread of FastAPI's pool.
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created, "owned_by": "flaminko"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(admission.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(GenerationFailed)
    async def generation_failed(request, error: GenerationFailed):
        return JSONResponse(RequestError(500, str(error)).body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse(RequestError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse(RequestError(400, message).body(), status_code=400)

    return app


def check_options(model: str, *, max_batch_size: int, max_total_tokens: int, max_images: int, max_queue: int, scheduler: str) -> None:
    """build_app's options and the model's source, checked before anything is loaded (on Ray, before any
    replica starts)."""
    from ..hub import check_model_source

    for option, value, least in (
        ("--max-batch-size", max_batch_size, 1),
        ("--max-total-tokens", max_total_tokens, 2),
        ("--max-images", max_images, 0),
        ("--max-queue", max_queue, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{option} must be an integer of at least {least}, got {value!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    check_model_source(model, option="MODEL")


def generation_manager(model, stack, scheduler: str, max_batch_size: int, max_total_tokens: int, max_images: int):
    """The scheduler's generation manager for the loaded model."""
    from .continuous import ContinuousBatcher
    from .scheduler import ContinuousGenerateManager

    streamer_class, micro_batching_class = batching_classes(stack.stream_error)
    if scheduler == "continuous":

        def new_batcher():
            return ContinuousBatcher(model=model, slots=max_batch_size, columns=max_total_tokens, max_images=max_images)

        try:
            new_batcher()
        except ValueError as refused:
            logging.getLogger(__name__).warning("flaminko serve: micro-batching instead of continuous batching: %s", refused)
        else:
            return ContinuousGenerateManager(new_batcher, streamer_class, stack.stream_error)
    return micro_batching_class(max_batch_size=max_batch_size)


def check_image_count(messages: list[dict], max_images: int) -> None:
    count = sum(part["type"] == "image" for message in messages for part in message["content"])
    if count > max_images:
        raise RequestError(
            400, f"the conversation has {count} images; this server takes at most {max_images} (--max-images)", param="messages"
        )


def fit_to_row(body: dict, prompt_tokens: int, config, max_total_tokens: int) -> None:
    """The prompt and its answer must fit in a row of the running batch (`max_total_tokens`): a request
    that sets max_tokens beyond that is refused, one that does not is given the room left."""
    room = max_total_tokens - prompt_tokens
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if room < 1 or (asked is not None and asked > room):
        wanted = f"{prompt_tokens} prompt tokens" + ("" if asked is None else f" and max_tokens={asked}")
        raise RequestError(
            400,
            f"{wanted} exceed the {max_total_tokens} tokens a request may have here (--max-total-tokens)",
            param="messages" if room < 1 else "max_tokens",
            code="context_length_exceeded",
        )
    config.max_new_tokens = room if config.max_new_tokens is None else min(config.max_new_tokens, room)


def sampling(body: dict, do_sample: bool) -> dict:
    """The sampling settings flaminko changes: OpenAI's temperature > 0 (or top_p < 1) samples, where
    transformers' handler keeps the model's default; a greedy request keeps no sampling settings (they
    would only be warned about)."""
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature != 0 and ((temperature is not None and temperature > 0) or (top_p is not None and top_p < 1)):
        return {"do_sample": True}
    return {} if do_sample else {"temperature": None, "top_p": None}


def check_model(body: dict, served_name: str, source: str) -> None:
    requested = body.get("model")
    if requested is None:
        raise RequestError(400, f"`model` is required: this server serves `{served_name}`", param="model")
    if not isinstance(requested, str):
        raise RequestError(400, f"`model` must be a string, got {requested!r}", param="model")
    if requested not in (served_name, source):
        raise RequestError(
            404, f"The model `{requested}` does not exist: this server serves `{served_name}`", param="model", code="model_not_found"
        )


def check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"`seed` must be an integer, got {seed!r}", param="seed")
    return seed


def check_settings(body: dict) -> None:
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
    number("frequency_penalty", -2, 2)
    bias = body.get("logit_bias")
    if bias is not None and not (
        isinstance(bias, dict)
        and all(key.isdigit() and isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100 for key, value in bias.items())
    ):
        raise RequestError(400, "`logit_bias` must map token ids to numbers in [-100, 100]", param="logit_bias")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, list) and 0 < len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)):
        raise RequestError(400, f"`stop` must be a non-empty string or a list of 1 to 4 of them, got {stop!r}", param="stop")
    if body.get("n") not in (None, 1):
        raise RequestError(400, f"`n` must be 1: this server answers with one choice, got {body['n']!r}", param="n")
    if body.get("generation_config") is not None:
        raise RequestError(
            400,
            "`generation_config` is not accepted: set temperature, top_p, max_tokens, stop and seed instead",
            param="generation_config",
        )


def check_messages(messages) -> list[dict]:
    """The conversation in the processor's shape, each field checked; image parts keep their URL and
    where they were (`messages[i].content[j]`) until they are loaded."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` must be a non-empty list of messages", param="messages")
    conversation = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with `role` and `content`", param="messages")
        if message.get("role") not in ROLES:
            roles = ", ".join(f"'{role}'" for role in ROLES)
            raise RequestError(400, f"{where}.role must be one of {roles}, got {message.get('role')!r}", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError(400, f"{where}.content must be a string or a list of content parts", param="messages")
        conversation.append({"role": message["role"], "content": [_part(part, f"{where}.content[{at}]") for at, part in enumerate(content)]})
    return conversation


def _part(part, where: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(400, f"{where}.text must be a string", param="messages")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str) or not url:
            raise RequestError(400, f"{where}.image_url.url must be a non-empty string", param="messages")
        return {"type": "image", "url": url, "where": where}
    raise RequestError(400, f"{where} must be an object of type 'text' or 'image_url', got {kind!r}", param="messages")


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", **options) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    check_port(port)
    app = build_app(model, log_level=log_level, **options)
    print(f"Serving {options.get('served_model_name') or model} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")


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
