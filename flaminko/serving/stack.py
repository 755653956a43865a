"""The adapter between flaminko serve and transformers' serving stack (`transformers serve`, the modules
of `transformers.cli.serving`): the one place that imports them. They are not a public API and change
between releases, so flaminko serve takes from them only the chat-completion handler (request fields,
generation settings, OpenAI's response and SSE shapes), the error item that ends a stream and the
handler's generation state, and builds the rest itself or on public APIs: the model and processor
load through the Auto classes, the streamer and the batching generation manager are flaminko's own
(`batching`), and the app is FastAPI's, with its own routes.

What changed inside the package's transformers window and touched flaminko serve, and why it no
longer does:
- 5.24's `ModelManager.process_model_name` keeps a local path without the `@main` 5.23 appended, so
  splitting a revision off the name failed ("not enough values to unpack"); and 5.24's `/v1/models`
  calls `ModelManager.list_models()` where 5.23 called `get_gen_models()`. flaminko serve uses neither
  the model manager nor transformers' app.
- 5.25 runs each model in a process of its own behind an `EngineClient`: the handler's responses take
  that engine and the request's generation kwargs (`_build_generation_kwargs`, a dict) where 5.23 and
  5.24 took the model, the processor, a `GenerationConfig` (`_build_generation_config`) and a
  generation manager; and `DirectStreamer` and `BaseGenerateManager` are gone (a `Detokenizer` decodes
  the tokens the engine sends back). Here the handler's two shapes are met once (`generation_config`,
  `respond`); on 5.25 a `FlaminkoEngine` stands for the engine client, over flaminko's own manager.
  5.25's streamed responses (`EventStream`) no longer watch for a client that leaves (uvicorn speaks
  ASGI 2.3, and its `send` drops what a gone client would get); its `CancelOnDisconnect` middleware
  does, by cancelling the request's task, and flaminko serve's app adds it (`disconnect_middleware`):
  without it a stream whose client left would hold its row to the end.
A release that removes or renames a piece listed in `used()` ends in one ImportError naming it.

Continuous batching (`continuous`) reaches into transformers in two more places, both here and the same
on 5.23 through 5.25:
- the cache: `SlotCache` keeps the rows of the running batch in a `StaticCache`, whose full-attention
  layers (`StaticLayer`) write a step's keys/values at one column for every row (`cumulative_length`),
  allocate their store in `lazy_initialization` and hold it as `keys` and `values`; a prefill's
  `DynamicCache` holds its layers' tensors as `layers[i].keys` and `.values`;
- a request's settings: `decoding_settings` prepares them as generate does, with generate's own
  private steps (`_prepare_generation_config`, `_prepare_special_tokens`, `_get_logits_processor`), so
  that a row's tokens are chosen as generate alone would choose them.
"""

import copy
from importlib.metadata import version
from importlib.util import find_spec

import torch
from packaging.version import Version

INSTALL_HINT = "pip install 'flaminko[serve]'"
# From this release on, the handler's responses talk to an engine client (see the module's docstring).
ENGINE_RELEASE = Version("5.25")


def used(engines: bool) -> dict:
    """module of transformers.cli.serving -> {name: methods of it flaminko serve calls}."""
    settings = "_build_generation_kwargs" if engines else "_build_generation_config"
    utils = {"GenerationState": (), "_StreamError": ()}
    if engines:
        utils["CancelOnDisconnect"] = ()
    return {
        "chat_completion": {"ChatCompletionHandler": ("_validate_request", settings, "_streaming", "_non_streaming")},
        "utils": utils,
    }


class FlaminkoEngine:
    """What transformers 5.25's handler uses of an `EngineClient`, for one request: the model's name,
    config and processor, and its generation, run by flaminko's batching manager with the request's
    `GenerationConfig` (the handler's generation kwargs only tell it the token budget)."""

    def __init__(self, model, processor, model_id: str, generation_config, manager, request_id: str):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.model_config, self.generation_config = model.config, generation_config
        self.manager, self.request_id = manager, request_id
        self.use_cb = False

    def generate_streaming(self, inputs, generation_kwargs, response_parser=None):
        return self.manager.generate_streaming(
            self.model, self.processor, inputs, self.generation_config, self.request_id, response_parser=response_parser
        )

    async def generate_non_streaming(self, inputs, generation_kwargs):
        return await self.manager.generate_non_streaming(
            self.model, self.processor, inputs, self.generation_config, self.request_id
        )


class TransformersServing:
    """transformers' serving modules, checked: `.chat_completion` and `.utils`, and the two shapes of
    the chat-completion handler's internals, met here once."""

    def __init__(self):
        from ..configuration_flaminko import TRANSFORMERS_VERSION, TRANSFORMERS_WINDOW

        missing = [name for name in ("fastapi", "uvicorn", "openai") if find_spec(name) is None]
        if missing:
            raise ImportError(f"flaminko serve needs FastAPI, uvicorn and openai ({', '.join(missing)} missing): {INSTALL_HINT}")
        self.engines = TRANSFORMERS_VERSION >= ENGINE_RELEASE
        try:
            from transformers.cli.serving import chat_completion, utils

            modules = {"chat_completion": chat_completion, "utils": utils}
            for module_name, names in used(self.engines).items():
                for name, methods in names.items():
                    owner = getattr(modules[module_name], name)
                    for method in methods:
                        getattr(owner, method)
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"transformers {version('transformers')} has changed the serving stack flaminko serve builds on "
                f"({error}); flaminko serve runs on transformers{TRANSFORMERS_WINDOW}"
            ) from error
        self.chat_completion, self.utils = chat_completion, utils
        self.stream_error = utils._StreamError
        # The ASGI middleware the app needs to notice a client leaving (None: the handler's responses do).
        self.disconnect_middleware = utils.CancelOnDisconnect if self.engines else None

    def generation_config(self, handler, body: dict, model_generation_config, amend):
        """The request's `GenerationConfig`: the handler reads the request's settings on top of the model's
        generation config; `amend(do_sample)` then gives the settings flaminko changes (name -> value)."""
        if not self.engines:
            config = handler._build_generation_config(body, model_generation_config)
            for name, value in amend(config.do_sample).items():
                setattr(config, name, value)
            return config
        settings = handler._build_generation_kwargs(body, model_generation_config)
        settings.update(amend(settings["do_sample"]))
        config = copy.deepcopy(model_generation_config)
        # Only what the request changes counts as set by it (validate warns about conflicting settings set).
        config.update(**{name: value for name, value in settings.items() if getattr(config, name, None) != value})
        return config

    async def respond(self, handler, request_id: str, body: dict, model, processor, model_id: str, inputs, config, manager):
        """The handler's answer, streamed (SSE) or whole (JSON), generated by `manager` with `config`."""
        if not self.engines:
            arguments = (request_id, model, processor, model_id, inputs, config)
            if body.get("stream"):
                return handler._streaming(*arguments, gen_manager=manager)
            return await handler._non_streaming(*arguments, gen_manager=manager)
        engine = FlaminkoEngine(model, processor, model_id, config, manager, request_id)
        generation_kwargs = config.to_dict()
        if body.get("stream"):
            return handler._streaming(request_id, engine, inputs, generation_kwargs, stream_options=body.get("stream_options"))
        return await handler._non_streaming(request_id, engine, inputs, generation_kwargs)


GENERATE_STEPS = ("_prepare_generation_config", "_prepare_special_tokens", "_get_logits_processor")


def decoding_settings(model, generation_config, prompt_ids):
    """A request's settings as generate prepares them for a prompt `prompt_ids` (1, P): the request's
    `generation_config` (None: the model's) merged over the model's generation config and transformers'
    defaults, its special-token tensors set, and the logits processors generate builds from it.
    Returns (config, processors)."""
    missing = [name for name in GENERATE_STEPS if not hasattr(model, name)]
    if missing:
        raise ImportError(
            f"transformers {version('transformers')} has changed generate's preparation continuous batching "
            f"reuses ({', '.join(missing)} missing)"
        )
    config, _ = model._prepare_generation_config(generation_config)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=prompt_ids.device)
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_ids.shape[-1],
        encoder_input_ids=prompt_ids,
        device=prompt_ids.device,
    )
    return config, processors


class SlotCache:
    """The language model's cache for continuous batching: transformers' `StaticCache`, `slots` rows by
    `columns` columns per layer, whose store flaminko reads and writes by row and column.

    A decoding step over rows [0, rows) takes `for_step(rows, column)`: every layer's first `rows` rows
    (views: the step writes into the store) and `column` as the one column the step writes for all of
    them. Layers of any other kind than full attention (sliding windows, linear attention) keep their
    own positions, and are refused."""

    def __init__(self, *, text_config, slots: int, columns: int):
        from transformers.cache_utils import StaticCache, StaticLayer

        self.cache = StaticCache(config=text_config, max_cache_len=columns)
        others = sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer})
        if others:
            raise ValueError(
                f"continuous batching needs full-attention layers only; this language model's cache also has {', '.join(others)}"
            )
        self.slots = slots
        # Allocated at the first placement, in the heads, head size, dtype and device the LM's layers give.
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None

    def place(self, row: int, prefill_cache, source: int, length: int, end: int) -> None:
        """Copies the last `length` keys and values of row `source` of a prefill's cache (a DynamicCache of
        a left-padded batch) into `row`, at columns [end - length, end)."""
        layers = prefill_cache.layers
        if self.keys is None:
            self._allocate(layers)
        for keys, values, layer in zip(self.keys, self.values, layers):
            keys[row, :, end - length : end] = layer.keys[source, :, -length:]
            values[row, :, end - length : end] = layer.values[source, :, -length:]

    def move(self, source: int, target: int) -> None:
        """Row `source`'s keys and values, every column, into row `target`."""
        for store in (*self.keys, *self.values):
            store[target] = store[source]

    def gather_columns(self, rows: int, index: torch.LongTensor) -> None:
        """index (rows, kept): for each of rows [0, rows), the columns to keep, in order; they become its
        columns [0, kept)."""
        for store in (*self.keys, *self.values):
            # (rows, kept) -> (rows, heads, kept, head_dim), the layout of the store
            spread = index[:, None, :, None].expand(-1, store.shape[1], -1, store.shape[-1])
            store[:rows, :, : index.shape[1]] = store[:rows].gather(2, spread)

    def for_step(self, rows: int, column: int):
        """The cache a decoding step over rows [0, rows) takes, writing at `column`."""
        for layer, keys, values in zip(self.cache.layers, self.keys, self.values):
            layer.keys, layer.values = keys[:rows], values[:rows]
            layer.cumulative_length.fill_(column)
        return self.cache

    def _allocate(self, prefill_layers) -> None:
        for layer, prefill_layer in zip(self.cache.layers, prefill_layers):
            # lazy_initialization sizes the store (batch, heads, columns, head_dim) from the tensors it is given.
            layer.lazy_initialization(
                prefill_layer.keys[:1].expand(self.slots, -1, -1, -1), prefill_layer.values[:1].expand(self.slots, -1, -1, -1)
            )
        self.keys = [layer.keys for layer in self.cache.layers]
        self.values = [layer.values for layer in self.cache.layers]
