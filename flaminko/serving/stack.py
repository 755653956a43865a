"""The adapter between flaminko serve and transformers' serving stack (`transformers serve`, the modules
of `transformers.cli.serving`): the one place that imports them. They are not a public API and change
between releases, so flaminko serve takes from them only the chat-completion handler (request fields,
generation settings, OpenAI's response and SSE shapes) and the streaming and generation-manager
interfaces, and builds the rest on public APIs: the model and processor load through the Auto classes,
and the app is FastAPI's, with its own routes.

What changed inside the package's transformers window and touched flaminko serve, and why it no
longer does:
- 5.24's `ModelManager.process_model_name` keeps a local path without the `@main` 5.23 appended, so
  splitting a revision off the name failed ("not enough values to unpack"); and 5.24's `/v1/models`
  calls `ModelManager.list_models()` where 5.23 called `get_gen_models()`. flaminko serve uses neither
  the model manager nor transformers' app.
A release that removes or renames a piece listed in USED ends in one ImportError naming it.
"""

from importlib.metadata import version
from importlib.util import find_spec

INSTALL_HINT = "pip install 'flaminko[serve]'"

# module of transformers.cli.serving -> {name: methods of it flaminko serve calls or overrides}
USED = {
    "chat_completion": {
        "ChatCompletionHandler": ("_validate_request", "_build_generation_config", "_streaming", "_non_streaming"),
    },
    "utils": {
        "BaseGenerateManager": ("generate_streaming", "generate_non_streaming"),
        "DirectStreamer": ("_enqueue", "put", "end"),
        "GenerationState": (),
        "_GenerationCancelled": (),
        "_StreamError": (),
    },
}


class TransformersServing:
    """transformers' serving modules, checked: `.chat_completion` and `.utils`."""

    def __init__(self):
        from ..configuration_flaminko import TRANSFORMERS_WINDOW

        missing = [name for name in ("fastapi", "uvicorn", "openai") if find_spec(name) is None]
        if missing:
            raise ImportError(f"flaminko serve needs FastAPI, uvicorn and openai ({', '.join(missing)} missing): {INSTALL_HINT}")
        try:
            from transformers.cli.serving import chat_completion, utils

            modules = {"chat_completion": chat_completion, "utils": utils}
            for module_name, names in USED.items():
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
