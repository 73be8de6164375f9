"""Command line of the miniature world.

    python -m llama3vision_min.miniature train [--stage A|B|C|D|all] [--out DIR] [--quick] [--seed N] [--ship]
    python -m llama3vision_min.miniature eval [--model DIR] [--n 500]
    python -m llama3vision_min.miniature sample SEED [--save PICTURE.png]
"""

import argparse
import json
import os
import sys
from pathlib import Path

from ..training.stage1 import _positive_int, _seed


def _parser():
    parser = argparse.ArgumentParser(prog="python -m llama3vision_min.miniature",
                                     description="Train, evaluate and sample the miniature "
                                                 "llama-3-vision-alpha.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train",
                                help="run training stages A (vision), B (LLM), C (projector), D (LLM swap)")
    train.add_argument("--stage", default="all", choices=["A", "B", "C", "D", "all"])
    train.add_argument("--out", default=None,
                       help="working folder for stage outputs (default: a folder in your own cache)")
    train.add_argument("--quick", action="store_true", help="the shortened CI recipe (a minute or two)")
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--ship", action="store_true",
                       help="copy the trained miniature into the package "
                            "(llama3vision_min/miniature/checkpoint)")
    train.add_argument("--threads", type=_positive_int, default=2,
                       help="torch threads (default: %(default)s)")
    train.add_argument("--no-progress", action="store_true")
    evaluate = commands.add_parser("eval", help="exact-match accuracy per question type on held-out pictures")
    evaluate.add_argument("--model", default=None, help="a miniature folder (default: the shipped one)")
    evaluate.add_argument("--n", type=_positive_int, default=500,
                          help="number of pictures (default: %(default)s)")
    evaluate.add_argument("--threads", type=_positive_int, default=2)
    sample = commands.add_parser("sample", help="print one example; optionally save its picture")
    sample.add_argument("seed", type=_seed)
    sample.add_argument("--save", default=None,
                        help="a new file for the picture (an existing one is not overwritten)")
    return parser


class CommandError(Exception):
    """An error with a message meant for the user: one line on stderr, exit status 1."""


def sample_command(args):
    from .world import sample

    image, question, answer = sample(args.seed)
    if args.save:
        save = Path(args.save)
        if save.exists() or save.is_symlink():  # a dangling link too: saving would write where it points
            raise CommandError(f"--save {save} exists; choose a new file name")
        try:
            image.save(save)
        except (OSError, ValueError) as error:  # a folder that is not there, an unknown extension
            raise CommandError(f"could not save the picture to {save}: {error}") from None
    print(f"{question} -> {answer}")


def eval_command(args):
    from .evaluate import evaluate
    from .run import CHECKPOINT_DIR, load_mini

    try:
        model, tokenizer = load_mini(args.model or CHECKPOINT_DIR)
    except (ValueError, OSError) as error:
        raise CommandError(str(error).splitlines()[0]) from None
    result = evaluate(model, tokenizer, n=args.n)
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=2))


def train_command(args):
    from .run import STAGES, train_all
    from .stages import Recipe

    if args.ship and (args.quick or args.stage != "all"):
        raise CommandError("--ship needs a full run (--stage all, without --quick)")
    recipe = Recipe.quick(seed=args.seed) if args.quick else Recipe(seed=args.seed)
    from .stand_ins import private_cache

    try:  # by default in a folder of this user's own, never a shared temp folder another user could plant
        out = Path(args.out or private_cache() / f"miniature{'-quick' if args.quick else ''}")
    except ValueError as error:
        raise CommandError(str(error)) from None
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; name a folder")
    stages = STAGES if args.stage == "all" else (args.stage,)
    try:
        report = train_all(recipe, out, stages=stages, ship=args.ship, progress=not args.no_progress)
    except ValueError as error:  # e.g. a stage whose inputs an earlier stage has not written
        raise CommandError(str(error).splitlines()[0]) from None
    summary = {stage: {k: v for k, v in report[stage].items()
                       if k in ("stage_seconds", "loss_first", "loss_last",
                                "accuracy", "swapped", "control", "probe")}
               for stage in stages}
    for part in summary.values():
        for result in part.values():
            if isinstance(result, dict):
                result.pop("errors", None)
    print(json.dumps(summary, indent=2))
    print(f"stage outputs and report.json in {out}")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "sample":
            sample_command(args)
        else:
            import torch

            torch.set_num_threads(args.threads)
            if args.command == "eval":
                eval_command(args)
            else:
                train_command(args)
        sys.stdout.flush()
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # piped into a reader that stopped (``| head``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
