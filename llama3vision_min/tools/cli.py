"""Command line: ``python -m llama3vision_min ask --image PATH "QUESTION"`` and ``... export --out DIR``.

Errors the user can fix (a missing picture, a file that is not an image, a model path
that does not load) print one line on stderr and exit with status 1 -- no traceback.
"""

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "mini"
"""The model used when ``--model`` is not given: the shipped miniature (trained on coloured shapes)."""


class CliError(Exception):
    """An error with a message meant for the user."""


def _parser():
    parser = argparse.ArgumentParser(prog="python -m llama3vision_min",
                                     description="Ask llama-3-vision-alpha about a picture.")
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="answer one question about one picture")
    ask.add_argument("question", help="the question, e.g. 'what is this?'")
    ask.add_argument("--image", required=True, help="path to the picture")
    ask.add_argument("--model", default=DEFAULT_MODEL,
                     help="'mini' (the shipped miniature), 'tiny' (random weights: answers noise), a folder "
                          "in the -hf layout, or a Hub id such as qresearch/llama-3-vision-alpha-hf "
                          "(default: %(default)s)")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    ask.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling at temperature 0.2")
    ask.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    export = commands.add_parser("export", help="write a transformers-native LLaVA folder (see tools/llava_export.py)")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--model", default=DEFAULT_MODEL, help="as for ask (default: %(default)s)")
    export.add_argument("--vllm-names", action="store_true",
                        help="store weights under the names vLLM's llava loader reads (transformers 4.x and 5.x read them too)")
    return parser


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise CliError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise CliError(f"not a readable image: {path} ({type(error).__name__})") from None


def _load_model(name):
    from ..loading import load_tokenizer
    from ..miniature import load_mini
    from ..miniature.stand_ins import load_tiny
    from ..model import LlamaVision

    if name == "tiny":
        return load_tiny()
    if name == "mini":
        try:
            return load_mini()
        except ValueError as error:
            raise CliError(str(error)) from None
    try:
        model = LlamaVision.from_pretrained(name)
        tokenizer = load_tokenizer(name)
    except (ValueError, OSError) as error:
        raise CliError(f"could not load model {name!r}: {str(error).splitlines()[0]}") from None
    return model, tokenizer


def ask(args):
    import torch

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    image = _open_image(args.image)
    model, tokenizer = _load_model(args.model)
    torch.manual_seed(args.seed)
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.greedy:
        kwargs["do_sample"] = False
    ids = model.answer_question(image, args.question, tokenizer, **kwargs)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a terminal that cannot show a character
    print(tokenizer.decode(ids, skip_special_tokens=True).strip())


def export(args):
    from .llava_export import export_llava

    model, tokenizer = _load_model(args.model)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"--out {out} exists and is not empty; choose a new folder")
    export_llava(model, tokenizer, out, vllm_names=args.vllm_names)
    print(out)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "ask":
            ask(args)
        elif args.command == "export":
            export(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main_entry():
    """Console-script entry point (``llama3vision-min ask ...``)."""
    raise SystemExit(main())
