"""`flaminko serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`, `/health`).

- requests are checked once, at the boundary (`app`): the model's name, the generation settings, every
  message's shape; errors come back in OpenAI's JSON shape (`{"error": {"message", "type", "param",
  "code"}}`) naming the field;
- images (`images`): data URLs; local files only under the folder the operator allows; http(s) URLs
  from public addresses only, unless allowed, within a deadline and a size cap; fetched, decoded and
  made into the prompt off the event loop, so a slow image holds up no other client;
- the prompt is the model folder's chat template, as `flaminko chat` uses it;
- generation (`batching`): queued requests with the same settings share one `generate` batch;
- transformers' chat-completion handler (request fields, settings, response shapes), reached through one
  adapter (`stack`) that meets each release's shape of it; the streamer is flaminko's own.
"""

from .app import BackgroundServer, RequestError, build_app, serve
from .batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE, collate
from .images import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_IMAGE_MB, ImageRefused, ImageSources, is_public_address

__all__ = [
    "DEFAULT_BATCH_WINDOW_MS",
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_IMAGE_MB",
    "BackgroundServer",
    "ImageRefused",
    "ImageSources",
    "RequestError",
    "build_app",
    "collate",
    "is_public_address",
    "serve",
]
