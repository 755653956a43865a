"""The `flaminko` command: one subcommand per job.

A subcommand is two functions and one line: `_add_<name>(commands)` builds its parser,
`_<name>(args)` runs it (importing torch, transformers and the rest inside, so that `--help` and
argument errors come at once), and RUNS maps the name to the run function.

Conventions, the same for every subcommand:
- a user mistake (ValueError, TypeError, OSError such as FileNotFoundError or an unreachable Hub,
  ImportError, FloatingPointError) ends in one line, `flaminko <cmd>: error: <what and how to fix>`,
  and exit status 2, never a traceback; `--debug` or FLAMINKO_DEBUG=1 shows the traceback;
- Ctrl-C ends quietly with exit status 130;
- a model is a local folder or a Hub id, checked before loading (flaminko.hub).
"""

import argparse
import os
import sys

DEBUG_ENVIRONMENT_VARIABLE = "FLAMINKO_DEBUG"
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError)
# The released models `flaminko convert open-flamingo --preset` knows (flaminko.conversion.presets.PRESETS).
PRESET_NAMES = (
    "OpenFlamingo-3B-vitl-mpt1b",
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct",
    "OpenFlamingo-4B-vitl-rpj3b",
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct",
    "OpenFlamingo-9B-vitl-mpt7b",
    "OpenFlamingo-9B-deprecated",
    "OpenFlaminKO",
)


def _add_demo(commands):
    demo = commands.add_parser("demo", help="train a small Korean captioner offline and caption unseen combinations")
    demo.add_argument("--out", default="flaminko-demo", help="folder for the data, backbones, model and contact sheet")
    demo.add_argument("--steps", type=int, help="Flaminko training steps (default 1500; the vision tower pretrains twice as many)")
    demo.add_argument("--seed", type=int, default=0)


def _demo(args):
    from .demo import DEMO_STEPS, run_demo

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    run_demo(out=args.out, steps=args.steps or DEMO_STEPS, seed=args.seed)


def _add_convert(commands):
    convert = commands.add_parser("convert", help="convert OpenFlamingo / flamingo-mini checkpoints to Flaminko")
    sources = convert.add_subparsers(dest="source", required=True)

    open_flamingo = sources.add_parser(
        "open-flamingo", help="OpenFlamingo / OpenFlaminKO / OmniCorpus checkpoint (.pt, .bin, .safetensors)"
    )
    open_flamingo.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        metavar="NAME",
        help="a released model, its checkpoint downloaded and its settings filled in: " + ", ".join(PRESET_NAMES),
    )
    open_flamingo.add_argument("--checkpoint", help="flat state dict or training checkpoint (with --preset: instead of the download)")
    open_flamingo.add_argument(
        "--vision", help="CLIP: Hub id or folder, or an open_clip visual state dict file (with --preset: a local copy)"
    )
    open_flamingo.add_argument("--lm", help="causal LM: Hub id or folder, MosaicGPT included (with --preset: a local copy)")
    open_flamingo.add_argument("--tokenizer", help="tokenizer, if not the LM's")
    open_flamingo.add_argument("--cross-attn-every-n-layers", type=int, help="default 1 (with --preset: the release's)")
    open_flamingo.add_argument(
        "--init-missing-token-rows",
        action="store_true",
        help="allow new-token embedding rows the checkpoint lacks (e.g. LLaMA lm_head); set them to the mean row",
    )
    open_flamingo.add_argument(
        "--vision-convention",
        choices=("openflamingo", "open_clip-2.23", "open_clip-2.29"),
        help="how the checkpoint's training read the patch tokens: the open_clip version it ran with "
        "(default openflamingo: before 2.23, OpenFlamingo's released models; see docs/conversion.md)",
    )
    open_flamingo.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the converted weights' dtype"
    )
    open_flamingo.add_argument("--verify", action="store_true", help="compare with OpenFlamingo's own code (float32)")
    open_flamingo.add_argument("--out", required=True)

    mini = sources.add_parser("flamingo-mini", help="flamingo-mini folder (config.json + weights)")
    mini.add_argument("--checkpoint", required=True, help="the flamingo-mini folder")
    mini.add_argument("--vision", help="CLIP config/image size source (default: its clip_model_type)")
    mini.add_argument("--lm", help="LM config and tokenizer source (default: its lm)")
    mini.add_argument("--out", required=True)


def _convert(args):
    from . import register_auto_classes
    from .conversion.flamingo_mini import convert_flamingo_mini
    from .conversion.open_flamingo import convert_open_flamingo

    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or folder")
    register_auto_classes()  # the written folder carries the remote code and an auto_map
    if args.source == "flamingo-mini":
        summary = convert_flamingo_mini(args.checkpoint, args.out, vision=args.vision, language_model=args.lm)
    else:
        settings = _open_flamingo_settings(args)
        summary = convert_open_flamingo(**settings, out=args.out, tokenizer=args.tokenizer, dtype=args.dtype, verify=args.verify)
    print(f"Flaminko folder written to {args.out}")
    print(summary)


def _open_flamingo_settings(args) -> dict:
    """convert_open_flamingo's arguments: the preset's, overridden by what the command line gives."""
    from .conversion.presets import resolve_preset

    if args.preset is not None:
        settings = resolve_preset(args.preset, checkpoint=args.checkpoint, language_model=args.lm, vision=args.vision)
    else:
        missing = [option for option, value in (("--checkpoint", args.checkpoint), ("--vision", args.vision), ("--lm", args.lm)) if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required without --preset")
        settings = {"checkpoint_path": args.checkpoint, "vision": args.vision, "language_model": args.lm}
    for name, value in (
        ("cross_attn_every_n_layers", args.cross_attn_every_n_layers),
        ("convention", args.vision_convention),
        ("init_missing_token_rows", args.init_missing_token_rows or None),
    ):
        if value is not None:
            settings[name] = value
    return settings


def _add_eval(commands):
    evaluate = commands.add_parser(
        "eval", help="few-shot captioning (CIDEr, BLEU-4), VQA accuracy, classification by log-likelihood"
    )

    def option(name, **kwargs):  # OpenFlamingo's --snake_case names, and this CLI's --kebab-case too
        names = [name] + ([name.replace("_", "-")] if "_" in name else [])
        evaluate.add_argument(*names, **kwargs)

    option("--model", required=True, help="Flaminko folder or Hub id")
    option("--task", required=True, choices=("captioning", "vqa", "classification"))
    option(
        "--data",
        required=True,
        help="queries: Karpathy JSON, VQA questions JSON, or TSV/CSV/JSONL; or a Hugging Face dataset (a Hub id, "
        "a .parquet file or a folder of them, a save_to_disk folder)",
    )
    option("--annotations", help="VQAv2 / OK-VQA annotations JSON of --data")
    option("--support", help="support set the demonstrations come from (same formats)")
    option("--support_annotations", help="VQAv2 / OK-VQA annotations JSON of --support")
    option("--class_names", help="classification: class names, one a line, or a JSON list")
    option("--image_root", help="folder of --data's images (default: the data file's folder)")
    option("--support_image_root", help="folder of --support's images")
    option("--split", default="test", help="Karpathy or Hugging Face dataset split of --data (default test)")
    option("--support_split", default="train", help="Karpathy (with restval) or Hugging Face dataset split of --support (default train)")
    option("--config", help="the configuration (subset) of a Hub dataset given as --data or --support")
    option("--image_column", help="a Hugging Face dataset's image column (default: the first of image, img, image_path, file_name)")
    option("--text_column", help="captioning: its captions column (default: the first of caption, captions, text, sentences)")
    option("--question_column", help="VQA: its question column (default: question)")
    option("--answers_column", help="VQA: its answers column (default: the first of answers, answer)")
    option("--label_column", help="classification: its label column (default: the first of label, class_name)")
    option("--shots", type=int, nargs="+", default=[0], help="e.g. --shots 0 4 8 16 32")
    option("--trials", type=int, default=1, help="seeds per shot count (mean and std reported)")
    option("--seed", type=int, default=42)
    option("--rices", action="store_true", help="demonstrations by image similarity (RICES), not at random")
    option("--rices_cache", help="folder caching the support set's RICES features")
    option("--prompt_format", default="open_flamingo", choices=("open_flamingo", "plain"))
    option("--num_beams", type=int, help="default 3 (OpenFlamingo's)")
    option("--max_new_tokens", type=int, help="default 20 for captions, 5 for VQA")
    option("--no_length_normalize", action="store_true", help="classification: sum, not mean, log-probs")
    option("--caption_tokenizer", default="auto", choices=("auto", "ptb", "korean"))
    option("--batch_size", type=int, default=8)
    option("--limit", type=int, help="evaluate the first N queries only")
    option("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    option("--device", help="e.g. cpu, cuda:0 (default: accelerate's device for this process)")
    option("--out", default="flaminko-eval", help="folder for results.json and the predictions (resumed)")


def _eval(args):
    from .evaluation import evaluate

    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "model", "out", "no_length_normalize")}
    report = evaluate(args.model, **options, length_normalize=not args.no_length_normalize, output_dir=args.out)
    if report is None:
        return
    for shots, metrics in report["metrics"].items():
        values = ", ".join(
            f"{name} {value['mean']:.2f} ± {value['std']:.2f}" if isinstance(value, dict) else f"{name} {value}"
            for name, value in metrics.items()
        )
        print(f"{report['task']} {shots}-shot ({report['num_samples']} samples, {report['trials']} trials): {values}")
    print(f"results: {args.out}/results.json")


def _add_model_options(parser):
    """--model, --device and --dtype, as caption and chat take them."""
    parser.add_argument("--model", required=True, help="a Flaminko folder or Hub id")
    _add_device_options(parser)


def _add_device_options(parser):
    """--device and --dtype of a loaded model."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda when there is one, else cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights' dtype (default auto: the checkpoint's)",
    )


def _add_caption(commands):
    caption = commands.add_parser("caption", help="caption images (files, folders, globs) with a Flaminko folder or Hub id")
    _add_model_options(caption)
    caption.add_argument("images", nargs="+", help="image files, folders (their images, sorted) or globs ('photos/*.jpg')")
    caption.add_argument("--prompt", default="<image>", help="text around the image, with one <image> (default: %(default)s)")
    caption.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=20)
    caption.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=3)
    caption.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="images per generate call")
    caption.add_argument(
        "--output", help="write the captions to this .tsv or .jsonl file (default: TSV lines on standard output)"
    )


def _caption(args):
    from .inference import caption_to_file, expand_images

    images = expand_images(args.images)
    caption_to_file(
        args.model,
        images,
        output=args.output,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )


def _add_chat(commands):
    chat = commands.add_parser("chat", help="interactive image-text conversation, answers streamed")
    _add_model_options(chat)
    chat.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64)


def _chat(args):
    from .inference import chat

    chat(args.model, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype)


def _add_serve(commands):
    from .serving import (
        DEFAULT_FETCH_TIMEOUT_S,
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MAX_IMAGE_MB,
        DEFAULT_MAX_IMAGES,
        DEFAULT_MAX_QUEUE,
        DEFAULT_MAX_TOTAL_TOKENS,
    )

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /metrics), continuous batching with images"
    )
    serve.add_argument("model", metavar="MODEL", help="a Flaminko folder or Hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument(
        "--served-model-name", "--served_model_name", dest="served_model_name",
        help="the name clients give as `model` (default: MODEL as given; MODEL itself is always accepted)",
    )
    _add_device_options(serve)
    batch = serve.add_argument_group(
        "the running batch (continuous batching: a request joins at the next step and leaves as it ends)"
    )
    batch.add_argument(
        "--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
        help="requests decoded together, each in a preallocated row of the cache (default: %(default)s)",
    )
    batch.add_argument(
        "--max-total-tokens", "--max_total_tokens", dest="max_total_tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
        help="cache columns a row holds: a request's prompt and answer together (default: %(default)s); "
        "a request without max_tokens gets the room its prompt leaves",
    )
    batch.add_argument(
        "--max-images", "--max_images", dest="max_images", type=int, default=DEFAULT_MAX_IMAGES,
        help="images a request may have (default: %(default)s)",
    )
    batch.add_argument(
        "--max-queue", "--max_queue", dest="max_queue", type=int, default=DEFAULT_MAX_QUEUE,
        help="requests admitted to wait for a row; beyond them a request gets 429 with Retry-After (default: %(default)s)",
    )
    images = serve.add_argument_group("request images (data URLs are always accepted)")
    images.add_argument(
        "--allow-local-files", "--allow_local_files", dest="allow_local_files", metavar="DIR",
        help="serve image paths and file:// URLs that resolve inside DIR (default: no local files)",
    )
    images.add_argument(
        "--no-fetch-images", "--no_fetch_images", dest="fetch_images", action="store_false",
        help="refuse http(s) image URLs (default: fetch them from public addresses)",
    )
    images.add_argument(
        "--allow-private-urls", "--allow_private_urls", dest="allow_private_urls", action="store_true",
        help="also fetch from loopback, private and link-local addresses (default: refused)",
    )
    images.add_argument(
        "--fetch-timeout", "--fetch_timeout", dest="fetch_timeout", type=float, default=DEFAULT_FETCH_TIMEOUT_S, metavar="SECONDS",
        help="deadline for fetching one image URL, redirects included (default: %(default)s)",
    )
    images.add_argument(
        "--max-image-mb", "--max_image_mb", dest="max_image_mb", type=float, default=DEFAULT_MAX_IMAGE_MB, metavar="MB",
        help="largest image file accepted, from any source (default: %(default)s)",
    )
    serve.add_argument("--log-level", "--log_level", dest="log_level", default="warning", choices=("debug", "info", "warning", "error"))
    ray = serve.add_argument_group(
        "Ray Serve: the same server as replicas on a Ray cluster (the one RAY_ADDRESS or `ray start` names, "
        "else a local one); --host and --port are where Ray's proxy listens"
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve (pip install 'flaminko[ray]')")
    ray.add_argument("--replicas", type=int, metavar="N", help="replicas, each with its own copy of the model and running batch (default 1)")
    ray.add_argument(
        "--max-replicas", "--max_replicas", dest="max_replicas", type=int, metavar="N",
        help="autoscale between --replicas and this many, aiming at --max-batch-size requests per replica (default: no autoscaling)",
    )
    ray.add_argument(
        "--replica-cpus", "--replica_cpus", dest="replica_cpus", type=float, metavar="CPUS",
        help="CPUs Ray gives each replica, also its torch threads (default 1)",
    )
    ray.add_argument(
        "--replica-gpus", "--replica_gpus", dest="replica_gpus", type=float, metavar="GPUS",
        help="GPUs Ray gives each replica (default 0: the replica runs on the CPU); 1 for one replica per GPU",
    )


# `flaminko serve` options that only Ray Serve takes.
RAY_OPTIONS = {"replicas": "--replicas", "max_replicas": "--max-replicas", "replica_cpus": "--replica-cpus", "replica_gpus": "--replica-gpus"}


def _serve(args):
    from .serving import ImageSources, serve

    settings = {name: value for name, value in vars(args).items() if name not in ("command", "debug", "model", "ray")}
    images = ImageSources.from_options(settings)
    ray_settings = {name: value for name in RAY_OPTIONS if (value := settings.pop(name)) is not None}
    if not args.ray:
        if ray_settings:
            raise ValueError(f"{', '.join(RAY_OPTIONS[name] for name in ray_settings)}: Ray Serve's, taken only with --ray")
        serve(args.model, images=images, **settings)
        return
    from .serving.ray_deployment import run

    run(args.model, images=images, **settings, **ray_settings)


def _add_release(commands):
    release = commands.add_parser(
        "release", help="check a model or adapter folder, fill in what a Hub release needs, upload with --push"
    )
    release.add_argument("folder", help="the model folder (e.g. runs/ko/final) or LoRA adapter folder")
    release.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="ORG/NAME on the Hub")
    release.add_argument(
        "--base-model",
        "--base_model",
        dest="base_models",
        action="append",
        help="Hub id of a model this one is built on (repeat for several); for an adapter, the Hub id of its base "
        "model. Default: the backbones' Hub ids, when they were loaded from the Hub",
    )
    release.add_argument("--license", help="the card's license (Hub license id, e.g. apache-2.0, mit, other); default: the card's, else apache-2.0")
    release.add_argument("--push", action="store_true", help="upload (otherwise a dry run: check and list)")
    release.add_argument("--private", action="store_true")


def _release(args):
    from .release import release

    release(
        args.folder, args.repo_id, push=args.push, private=args.private, base_models=args.base_models, license=args.license
    )


def _add_train(commands):
    commands.add_parser(
        "train",
        add_help=False,
        help="fine-tune with the Trainer (Flaminko options, then TrainingArguments; see `flaminko train --help`)",
    )


def _train(args):
    if any(argument in ("-h", "--help") for argument in args.arguments):
        print(_train_help(), end="")
        return
    from .training import main as train_main

    train_main(args.arguments)


def _train_help() -> str:
    """`flaminko train --help`. Rendering it imports TrainingArguments (and with it torch and
    accelerate: seconds), so the text is kept in the user's cache, keyed by everything it depends on:
    the versions, training.py itself and the terminal's width."""
    import shutil
    from importlib.metadata import version
    from pathlib import Path

    from . import __version__

    source = Path(__file__).with_name("training.py").stat()
    key = f"{__version__}-{version('transformers')}-{source.st_mtime_ns}-{source.st_size}-{shutil.get_terminal_size().columns}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flaminko" / f"train-help-{key}.txt"
    if cache.is_file():
        return cache.read_text(encoding="utf-8")
    from .training import argument_parser

    text = argument_parser().format_help()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staged = cache.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(text, encoding="utf-8")
        staged.replace(cache)
    except OSError:
        pass  # a read-only home: the help is still printed, only not kept
    return text


RUNS = {
    "demo": _demo,
    "convert": _convert,
    "eval": _eval,
    "caption": _caption,
    "chat": _chat,
    "serve": _serve,
    "release": _release,
    "train": _train,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flaminko",
        description="Flaminko: a Hugging Face-native Flamingo.",
        epilog=f"--debug (or {DEBUG_ENVIRONMENT_VARIABLE}=1) shows the traceback behind an error message.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_convert(commands)
    _add_eval(commands)
    _add_caption(commands)
    _add_chat(commands)
    _add_serve(commands)
    _add_release(commands)
    _add_train(commands)
    return parser


def one_line(error: BaseException) -> str:
    """The error's message on one line; an unreachable Hub gets the way round it."""
    from .hub import OFFLINE_HINT, HubUnreachableError, endpoint, is_connection_error

    message = " ".join(str(error).split()) or type(error).__name__
    if is_connection_error(error) and not isinstance(error, HubUnreachableError):
        message = f"cannot reach the Hugging Face Hub at {endpoint()} ({message}); {OFFLINE_HINT}"
    return message


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get(DEBUG_ENVIRONMENT_VARIABLE)) or "--debug" in argv
    argv = [argument for argument in argv if argument != "--debug"]
    parser = build_parser()
    if argv[:1] == ["train"]:
        # The Trainer's own parser (HfArgumentParser) owns every option of this subcommand.
        args = argparse.Namespace(command="train", arguments=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        started_here = not _process_group_started()
        RUNS[args.command](args)
        if started_here and _process_group_started():
            # Torn down here, as torch.distributed asks programs to, not by destructors at the interpreter's
            # exit, where a rank's communication threads can abort it ("terminate called without an active
            # exception").
            sys.modules["torch.distributed"].destroy_process_group()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        from .hub import is_connection_error

        if debug or not (isinstance(error, USER_ERRORS) or is_connection_error(error) or _is_hub_error(error)):
            raise
        parser.exit(2, f"flaminko {args.command}: error: {one_line(error)}\n")


def _process_group_started() -> bool:
    """Whether torch.distributed has a default process group (a launched train or eval run starts one);
    torch is not imported to find out."""
    distributed = sys.modules.get("torch.distributed")
    return bool(distributed and distributed.is_available() and distributed.is_initialized())


def _is_hub_error(error: BaseException) -> bool:
    """An HTTP error answered by the Hub (401, 404, 409...): its message is meant for the user."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(error, HfHubHTTPError)


if __name__ == "__main__":
    main()
