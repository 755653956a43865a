"""The `flaminko` command: one subcommand per job."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flaminko", description="Flaminko: a Hugging Face-native Flamingo.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build, save, reload and run a tiny Flaminko offline")
    demo.add_argument("--out", default="flaminko-demo", help="folder for the backbones and the model")
    demo.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out=args.out, seed=args.seed)


if __name__ == "__main__":
    main()
