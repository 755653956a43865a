"""The `flaminko` command: one subcommand per job."""

import argparse
import sys


def _add_convert(commands):
    convert = commands.add_parser("convert", help="convert OpenFlamingo / flamingo-mini checkpoints to Flaminko")
    sources = convert.add_subparsers(dest="source", required=True)

    open_flamingo = sources.add_parser(
        "open-flamingo", help="OpenFlamingo / OpenFlaminKO / OmniCorpus checkpoint (.pt, .bin, .safetensors)"
    )
    open_flamingo.add_argument("--checkpoint", required=True, help="flat state dict or training checkpoint")
    open_flamingo.add_argument(
        "--vision", required=True, help="CLIP: Hub id or folder, or an open_clip visual state dict file"
    )
    open_flamingo.add_argument("--lm", required=True, help="causal LM: Hub id or folder")
    open_flamingo.add_argument("--tokenizer", help="tokenizer, if not the LM's")
    open_flamingo.add_argument("--cross-attn-every-n-layers", type=int, default=1)
    open_flamingo.add_argument(
        "--init-missing-token-rows",
        action="store_true",
        help="allow new-token embedding rows the checkpoint lacks (e.g. LLaMA lm_head); set them to the mean row",
    )
    open_flamingo.add_argument(
        "--vision-convention",
        choices=("openflamingo", "open_clip-2.23", "open_clip-2.29"),
        default="openflamingo",
        help="how the checkpoint's training read the patch tokens: the open_clip version it ran with "
        "(openflamingo: before 2.23, OpenFlamingo's released models; see docs/conversion.md)",
    )
    open_flamingo.add_argument("--verify", action="store_true", help="compare with OpenFlamingo's own code")
    open_flamingo.add_argument("--out", required=True)

    mini = sources.add_parser("flamingo-mini", help="flamingo-mini folder (config.json + weights)")
    mini.add_argument("--checkpoint", required=True, help="the flamingo-mini folder")
    mini.add_argument("--vision", help="CLIP config/image size source (default: its clip_model_type)")
    mini.add_argument("--lm", help="LM config and tokenizer source (default: its lm)")
    mini.add_argument("--out", required=True)


def _convert(args):
    from .conversion.flamingo_mini import convert_flamingo_mini
    from .conversion.open_flamingo import convert_open_flamingo

    if args.source == "flamingo-mini":
        summary = convert_flamingo_mini(args.checkpoint, args.out, vision=args.vision, language_model=args.lm)
    else:
        summary = convert_open_flamingo(
            args.checkpoint,
            args.vision,
            args.lm,
            args.out,
            cross_attn_every_n_layers=args.cross_attn_every_n_layers,
            tokenizer=args.tokenizer,
            init_missing_token_rows=args.init_missing_token_rows,
            convention=args.vision_convention,
            verify=args.verify,
        )
    print(f"Flaminko folder written to {args.out}")
    print(summary)


def _add_eval(commands):
    evaluate = commands.add_parser(
        "eval", help="few-shot captioning (CIDEr, BLEU-4), VQA accuracy, classification by log-likelihood"
    )

    def option(name, **kwargs):  # OpenFlamingo's --snake_case names, and this CLI's --kebab-case too
        names = [name] + ([name.replace("_", "-")] if "_" in name else [])
        evaluate.add_argument(*names, **kwargs)

    option("--model", required=True, help="Flaminko folder or Hub id")
    option("--task", required=True, choices=("captioning", "vqa", "classification"))
    option("--data", required=True, help="queries: Karpathy JSON, VQA questions JSON, or TSV/CSV/JSONL")
    option("--annotations", help="VQAv2 / OK-VQA annotations JSON of --data")
    option("--support", help="support set the demonstrations come from (same formats)")
    option("--support_annotations", help="VQAv2 / OK-VQA annotations JSON of --support")
    option("--class_names", help="classification: class names, one a line, or a JSON list")
    option("--image_root", help="folder of --data's images (default: the data file's folder)")
    option("--support_image_root", help="folder of --support's images")
    option("--split", default="test", help="Karpathy split of --data (default test)")
    option("--support_split", default="train", help="Karpathy split of --support (default train, with restval)")
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

    options = {k: v for k, v in vars(args).items() if k not in ("command", "model", "out", "no_length_normalize")}
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flaminko", description="Flaminko: a Hugging Face-native Flamingo.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small Korean captioner offline and caption unseen combinations")
    demo.add_argument("--out", default="flaminko-demo", help="folder for the data, backbones, model and contact sheet")
    demo.add_argument("--steps", type=int, help="Flaminko training steps (default 1500; the vision tower pretrains 2x)")
    demo.add_argument("--seed", type=int, default=0)
    _add_convert(commands)
    _add_eval(commands)
    caption = commands.add_parser("caption", help="caption images with a Flaminko folder or Hub id")
    caption.add_argument("--model", required=True)
    caption.add_argument("images", nargs="+")
    caption.add_argument("--prompt", default="<image>", help="text around the image, with one <image>")
    caption.add_argument("--max-new-tokens", type=int, default=20)
    caption.add_argument("--num-beams", type=int, default=3)
    chat = commands.add_parser("chat", help="interactive image-text conversation, answers streamed")
    chat.add_argument("--model", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    release = commands.add_parser("release", help="check a model or adapter folder, fill in what a Hub release needs, upload")
    release.add_argument("folder")
    release.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    release.add_argument("--push", action="store_true", help="upload (otherwise only list what would be uploaded)")
    release.add_argument("--private", action="store_true")
    train = commands.add_parser(
        "train", add_help=False, help="fine-tune with the Trainer (TrainingArguments + model and data arguments)"
    )
    train.add_argument("arguments", nargs="*", help="options (see `flaminko train --help`), or one YAML/JSON file")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # The Trainer's own parser (HfArgumentParser) owns every option of this subcommand.
        from .training import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import DEMO_STEPS, run_demo

            run_demo(out=args.out, steps=args.steps or DEMO_STEPS, seed=args.seed)
        elif args.command == "convert":
            _convert(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "caption":
            from .inference import caption

            captions = caption(args.model, args.images, args.prompt, args.max_new_tokens, args.num_beams)
            for path, text in zip(args.images, captions):
                print(f"{path}\t{text}")
        elif args.command == "chat":
            from .inference import chat

            chat(args.model, max_new_tokens=args.max_new_tokens)
        elif args.command == "release":
            from .release import release

            release(args.folder, args.repo_id, push=args.push, private=args.private)

    except (ValueError, ImportError) as error:
        parser.exit(2, f"flaminko {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
