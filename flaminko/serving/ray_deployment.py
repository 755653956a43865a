"""`flaminko serve MODEL --ray`: the same OpenAI app as replicas on Ray Serve, on one machine or a
Ray cluster of many.

Each replica builds the app through `app.build_app` with the same options, so each one batches
continuously and admits requests on its own; Ray's proxy spreads the requests over the replicas,
starts a new replica where one's process dies, and, with autoscaling, adds and removes replicas with
the load. Every response says which replica answered in `x-flaminko-replica`: Ray's id for it, the one
`serve status`, the dashboard and the replica's log file name, so a slow or odd answer can be traced.

- `deployment(model, ...)`: the Ray Serve application, for Python code (`serve.run(deployment(...))`);
- `app(args)`: the same built from arguments, for Ray's own tools:
  `serve run flaminko.serving.ray_deployment:app model=FOLDER replicas=2`, or the `import_path` and
  `args` of a Serve config file;
- `launch(application, host=, port=)`: deploys it on the Ray cluster and returns its URL;
- `run(...)`: what the command line does (check, launch, wait for Ctrl-C, take the application down).
"""

import threading

try:
    from pydantic import BaseModel, ConfigDict
    from ray import serve
except ImportError as missing:
    raise ImportError(f"flaminko serve --ray needs Ray Serve ({missing}): pip install 'flaminko[ray]'") from missing

from .app import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOTAL_TOKENS,
    build_app,
    check_options,
    check_port,
)
from .images import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_IMAGE_MB, ImageSources

APP_NAME = "flaminko"
REPLICA_HEADER = b"x-flaminko-replica"


class ReplicaHeader:
    """ASGI middleware that names the replica in every HTTP response's headers (streamed ones included,
    which a middleware reading whole responses would hold back)."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, send_named)


@serve.deployment(name=APP_NAME)
@serve.ingress()
class FlaminkoReplica:
    """One replica: build_app's app over its own copy of the model, built when Ray starts the replica."""

    def __init__(self, model: str, options: dict):
        self.model, self.options = model, options

    def __serve_build_asgi_app__(self):
        app = build_app(self.model, **self.options)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app


def deployment(
    model: str,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    target_ongoing_requests: float | None = None,
    replica_cpus: float = 1,
    replica_gpus: float = 0,
    **options,
):
    """The Ray Serve application: `replicas` replicas of build_app(model, **options), each holding
    `replica_cpus` CPUs and `replica_gpus` GPUs of the cluster (Ray's `ray_actor_options`). A replica
    without a GPU loads the model on the CPU unless `device` says otherwise.

    With `max_replicas` above `replicas`, Ray's autoscaler keeps between the two, aiming at
    `target_ongoing_requests` requests per replica (default: max_batch_size, a full running batch).
    A replica is sent at most max_batch_size + max_queue requests at once (Ray's `max_ongoing_requests`,
    the room its own admission gives), so requests beyond the room of every replica wait in Ray's
    proxy for the first that has room."""
    batch = {
        "max_batch_size": options.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
        "max_total_tokens": options.get("max_total_tokens", DEFAULT_MAX_TOTAL_TOKENS),
        "max_images": options.get("max_images", DEFAULT_MAX_IMAGES),
        "max_queue": options.get("max_queue", DEFAULT_MAX_QUEUE),
        "scheduler": options.get("scheduler", "continuous"),
    }
    check_options(model, **batch)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be an integer of at least 1, got {replicas!r}")
    if max_replicas is not None and (isinstance(max_replicas, bool) or not isinstance(max_replicas, int) or max_replicas < replicas):
        raise ValueError(f"--max-replicas must be an integer of at least --replicas ({replicas}), got {max_replicas!r}")
    if target_ongoing_requests is not None and not (max_replicas or 0) > replicas:
        raise ValueError("target_ongoing_requests steers autoscaling: it needs max_replicas above replicas")
    for option, value in (("--replica-cpus", replica_cpus), ("--replica-gpus", replica_gpus)):
        if not value >= 0:
            raise ValueError(f"{option} must be a number of at least 0, got {value!r}")
    if not replica_gpus and options.get("device") is None:
        options["device"] = "cpu"  # a GPU Ray has not given this replica may be another replica's
    settings = {
        "max_ongoing_requests": batch["max_batch_size"] + batch["max_queue"],
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus},
    }
    if (max_replicas or 0) > replicas:
        settings["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests or batch["max_batch_size"],
        }
    else:
        settings["num_replicas"] = replicas
    return FlaminkoReplica.options(**settings).bind(model, options)


class Arguments(BaseModel):
    """The arguments `app` takes (`serve run ...:app model=FOLDER key=value ...`, or a config file's
    `args`): flaminko serve's options under their Python names, and the replicas' settings."""

    model_config = ConfigDict(extra="forbid")

    model: str
    served_model_name: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS
    max_images: int = DEFAULT_MAX_IMAGES
    max_queue: int = DEFAULT_MAX_QUEUE
    allow_local_files: str | None = None
    fetch_images: bool = True
    allow_private_urls: bool = False
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB
    log_level: str = "warning"
    replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1
    replica_gpus: float = 0


def app(args: Arguments):
    """The application builder of Ray's `serve run` and Serve config files."""
    settings = args.model_dump()
    images = ImageSources.from_options(settings)
    return deployment(settings.pop("model"), images=images, **settings)


def launch(application, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploys the application on the Ray cluster (the one this process is connected to, else the one
    `ray.init` finds, else a new local one) and returns its base URL once every replica is up. Ray's
    HTTP proxy listens at host:port on the cluster's nodes, where Serve was not already started."""
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application, name=APP_NAME, route_prefix="/")
    except RuntimeError as failed:  # "Deploying application flaminko failed: <the replicas' tracebacks>"
        last = [line for line in str(failed).splitlines() if line.strip()][-1].strip()
        raise ReplicasFailed(f"the replicas did not start: {last} (Ray's logs: /tmp/ray/session_latest/logs/serve)") from failed
    return f"http://{host}:{port}/v1"


class ReplicasFailed(OSError):
    """Ray Serve could not start the replicas (a model that does not load there, too little memory...)."""


def run(model: str, *, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    """`flaminko serve MODEL --ray`: deploys, serves until interrupted, then deletes the application
    (and stops the local Ray instance, if this process started one)."""
    import ray

    check_port(port)
    application = deployment(model, **settings)  # every option checked before Ray starts
    try:
        url = launch(application, host=host, port=port)
        replicas = settings.get("replicas", 1)
        if (settings.get("max_replicas") or 0) > replicas:
            replicas = f"{replicas} to {settings['max_replicas']}"
        name = settings.get("served_model_name") or model
        print(f"Serving {name} at {url} on Ray Serve, {replicas} replicas (Ctrl-C stops)", flush=True)
        threading.Event().wait()
    finally:
        if ray.is_initialized():
            serve.delete(APP_NAME)
            ray.shutdown()
