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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flaminko", description="Flaminko: a Hugging Face-native Flamingo.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small Korean captioner offline and caption unseen combinations")
    demo.add_argument("--out", default="flaminko-demo", help="folder for the data, backbones, model and contact sheet")
    demo.add_argument("--steps", type=int, help="Flaminko training steps (default 1500; the vision tower pretrains 2x)")
    demo.add_argument("--seed", type=int, default=0)
    _add_convert(commands)
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
