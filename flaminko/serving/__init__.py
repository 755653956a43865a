"""`flaminko serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`, `/health`).

- requests are checked once, at the boundary (`app`): the model's name, the generation settings, every
  message's shape; errors come back in OpenAI's JSON shape (`{"error": {"message", "type", "param",
  "code"}}`) naming the field;
- images (`images`): data URLs; local files only under the folder the operator allows; http(s) URLs
  from public addresses only, unless allowed, within a deadline and a size cap; fetched, decoded and
  made into the prompt off the event loop, so a slow image holds up no other client;
- the prompt is the model folder's chat template, as `flaminko chat` uses it;
- generation: continuous batching (`continuous`, `scheduler`): a request joins the running batch at the
  next decoding step and leaves it as it ends, each row with its own images; language models it refuses
  (MPT) fall back to micro-batching (`batching`: requests with the same settings share one `generate`);
- admission (`admission`): the running batch and a bounded queue; beyond them 429 with Retry-After;
  `/metrics` in Prometheus' text format (`metrics`);
- transformers' chat-completion handler (request fields, settings, response shapes), reached through one
  adapter (`stack`) that meets each release's shape of it; the streamer is flaminko's own.
"""

from .app import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOTAL_TOKENS,
    SCHEDULERS,
    BackgroundServer,
    RequestError,
    build_app,
    serve,
)
from .batching import collate
from .images import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_IMAGE_MB, ImageRefused, ImageSources, is_public_address

__all__ = [
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_MB",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_TOTAL_TOKENS",
    "SCHEDULERS",
    "BackgroundServer",
    "ImageRefused",
    "ImageSources",
    "RequestError",
    "build_app",
    "collate",
    "is_public_address",
    "serve",
]
