"""Local folders versus Hub ids, and a Hub that cannot be reached, said once and clearly.

Used by the command line before anything is loaded: a mistyped local path is named as such (not
"Repo id must be in the form..."), and an unreachable Hub ends in one line naming HF_HUB_OFFLINE=1
instead of a minute of retries.
"""

import os

OFFLINE_HINT = "with no network, give a local folder, or set HF_HUB_OFFLINE=1 to use the models in the local cache"


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached; the message says what to do instead."""


def is_hub_id(name: str) -> bool:
    """True for a string that names a Hub repository (NAME or ORG/NAME) and no local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_connection_error(error: BaseException) -> bool:
    """A network failure of huggingface_hub's HTTP client (whichever httpx it ships), or offline mode."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    return any(cls.__name__ in ("TransportError", "TimeoutException") for cls in type(error).__mro__)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_model_source(name: str, *, option: str = "--model") -> str:
    """Checks that `name` is an existing local folder or a model on the Hub, before any loading.

    A Hub id is looked up with one request: a missing repository or an unreachable Hub is reported
    here in one line (an unreachable Hub would otherwise be retried for about a minute). Models in
    the local cache are found without the network when HF_HUB_OFFLINE=1.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"{option} {name}: a folder without config.json, not a model folder")
        return name
    if os.path.exists(name):
        raise ValueError(f"{option} {name}: a file, but a model folder (with config.json) or a Hub id was expected")
    if not is_hub_id(name):
        raise FileNotFoundError(f"{option} {name}: no such folder, and not a Hub model id (ORG/NAME either)")
    if constants.HF_HUB_OFFLINE:
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise FileNotFoundError(
                f"{option} {name}: no such local folder, and not in the local Hub cache (HF_HUB_OFFLINE is set)"
            )
        return name
    try:
        HfApi().model_info(name, timeout=10)
    except GatedRepoError as error:
        raise PermissionError(f"{option} {name}: gated on the Hub; accept its terms and log in (hf auth login)") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{option} {name}: no such local folder, and no such model on the Hub (or it is private: log in)"
        ) from error
    except Exception as error:
        if not is_connection_error(error):
            raise
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        hint = "it is in the local cache: set HF_HUB_OFFLINE=1 to use it" if cached else OFFLINE_HINT
        raise HubUnreachableError(f"{option} {name}: cannot reach the Hub at {endpoint()} ({error}); {hint}") from error
    return name
