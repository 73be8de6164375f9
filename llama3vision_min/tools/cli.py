"""Command line: ``python -m llama3vision_min ask --image PATH "QUESTION"`` and ``... export --out DIR``
(a transformers LLaVA folder, or with ``--format gguf`` the two files llama.cpp runs).

The model is the shipped miniature by default; ``--model`` names another (``tiny``, a folder in the
``-hf`` layout or a Hub id such as ``qresearch/llama-3-vision-alpha-hf``), and ``--llm`` switches to
the alpha form (a Llama 3 LLM, ``--vision`` and ``--projector``, which default to the real ones).
It runs on the GPU when there is one, else on the CPU in bfloat16 or float32 (``--device``,
``--dtype`` and ``--load-in-4bit`` override that).

Errors the user can fix (a missing picture, a file that is not an image, a model that does not
load, options that do not go together) print one line on stderr and exit with status 1 -- no traceback.
"""

import argparse
import sys
from pathlib import Path

from ..training.stage1 import _positive_int, _seed

DEFAULT_MODEL = "mini"
"""The model used when neither ``--model`` nor ``--llm`` is given: the shipped miniature (trained on
coloured shapes)."""

DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = {"f32": "float32", "f16": "float16", "float32": "float32", "float16": "float16"}
"""``--dtype f32|f16`` (GGUF's names) mean float32|float16; for ``export --format gguf`` the files' type."""


class CliError(Exception):
    """An error with a message meant for the user."""


def _model_options(parser):
    parser.add_argument("--model", default=None,
                        help="'mini' (the shipped miniature), 'tiny' (random weights: answers noise), "
                             "a folder in the -hf layout, or a Hub id such as "
                             "qresearch/llama-3-vision-alpha-hf "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--llm", default=None,
                        help="the alpha form: a Llama 3 LLM (folder or Hub id, e.g. "
                             "unsloth/llama-3-8b-Instruct or a fine-tune of it), "
                             "with --vision and --projector")
    parser.add_argument("--vision", default=None, help="alpha form: the SigLIP model (default: the real one)")
    parser.add_argument("--projector", default=None,
                        help="alpha form: mm_projector.bin/.safetensors, a folder or a Hub id "
                             "(default: the real one)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: the GPU when there is one)")
    parser.add_argument("--dtype", default=None, choices=DTYPES + ("f32", "f16"),
                        help="default: float16 on a GPU; on a CPU bfloat16 where it computes it, "
                             "else float32 (export --format gguf: f32 or f16, the files' type; default f16)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="alpha form: the LLM in 4-bit (bitsandbytes; on a GPU, or on a CPU with "
                             "bitsandbytes >= 0.49)")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m llama3vision_min",
                                     description="Ask llama-3-vision-alpha about a picture.")
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="answer one question about one picture")
    ask.add_argument("question", help="the question, e.g. 'what is this?'")
    ask.add_argument("--image", required=True, help="path to the picture")
    _model_options(ask)
    ask.add_argument("--max-new-tokens", type=_positive_int, default=64, help="default: %(default)s")
    ask.add_argument("--greedy", action="store_true",
                     help="greedy decoding instead of sampling at temperature 0.2")
    ask.add_argument("--seed", type=_seed, default=0, help="random seed for sampling (default: %(default)s)")
    export = commands.add_parser("export",
                                 help="write a transformers-native LLaVA folder (tools/llava_export.py) "
                                      "or, with --format gguf, model.gguf and mmproj.gguf for llama.cpp")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", default="llava", choices=("llava", "gguf"),
                        help="llava: transformers' LlavaForConditionalGeneration (default); gguf: llama.cpp "
                             "(quantise model.gguf afterwards with llama.cpp's llama-quantize)")
    _model_options(export)
    export.add_argument("--vllm-names", action="store_true",
                        help="store weights under the names vLLM's llava loader reads "
                             "(transformers 4.x and 5.x read them too)")
    return parser


def _open_image(path):
    import warnings

    from PIL import Image, UnidentifiedImageError

    from ..image import PICTURE_FORMATS

    path = Path(path)
    if not path.is_file():
        raise CliError(f"image not found: {path}")
    Image.init()  # every format plugin registered, so that ``formats`` can name them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, not just warned about
            with Image.open(path, formats=PICTURE_FORMATS) as image:
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise CliError(f"refusing {path}: {error}") from None
    except UnidentifiedImageError:
        raise CliError(f"not a picture in a format this reads ({', '.join(PICTURE_FORMATS)}): "
                       f"{path}") from None
    except OSError as error:
        raise CliError(f"not a readable image: {path} ({type(error).__name__})") from None


def _placement(args):
    """``(device, dtype)`` from ``--device`` / ``--dtype``; ``dtype`` None leaves the loader's choice."""
    import re

    import torch

    from ..model import choose_device

    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise CliError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    device = choose_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device} asks for a GPU, but torch sees none")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CliError(f"--device {args.device}: torch sees {torch.cuda.device_count()} GPU(s)")
    return device, getattr(torch, GGUF_DTYPES.get(args.dtype, args.dtype)) if args.dtype else None


def _load_model(args):
    from ..loading import load_tokenizer
    from ..model import LlamaVision, choose_dtype
    from .backend import REAL_PROJECTOR, REAL_VISION

    alpha = args.llm is not None
    if alpha and args.model is not None:
        raise CliError("--model and --llm are two ways to name the model: give one")
    if not alpha and (args.vision or args.projector):
        raise CliError("--vision and --projector belong to the alpha form: give --llm too")
    if args.load_in_4bit and not alpha:
        raise CliError("--load-in-4bit needs the alpha form (--llm ...): the -hf loader reads "
                       "full-precision weights")
    device, dtype = _placement(args)
    name = args.model or DEFAULT_MODEL
    try:
        if alpha:
            model = LlamaVision.from_alpha(args.llm, args.vision or REAL_VISION,
                                           args.projector or REAL_PROJECTOR,
                                           dtype=dtype, device=device, load_in_4bit=args.load_in_4bit)
            return model, load_tokenizer(args.llm)
        if name in ("mini", "tiny"):
            from ..miniature import load_mini
            from ..miniature.stand_ins import load_tiny

            model, tokenizer = load_mini() if name == "mini" else load_tiny()
            return (model.to(device=device, dtype=dtype or choose_dtype(device, model.text_model.dtype)),
                    tokenizer)
        return LlamaVision.from_pretrained(name, dtype=dtype, device=device), load_tokenizer(name)
    except (ValueError, OSError) as error:
        raise CliError(f"could not load model {args.llm or name!r}: {str(error).splitlines()[0]}") from None


def ask(args):
    import torch

    try:
        args.question.encode("utf-8")
    except UnicodeEncodeError:
        raise CliError("the question is not valid UTF-8 text") from None
    image = _open_image(args.image)
    model, tokenizer = _load_model(args)
    torch.manual_seed(args.seed)
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.greedy:
        kwargs["do_sample"] = False
    try:
        ids = model.answer_question(image, args.question, tokenizer, **kwargs)
    except ValueError as error:  # the picture or the prompt refused by the model, with the reason
        raise CliError(str(error).splitlines()[0]) from None
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a terminal that cannot show a character
    print(tokenizer.decode(ids, skip_special_tokens=True).strip())


def export(args):
    from .llava_export import export_llava

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"--out {out} exists and {'is not empty' if out.is_dir() else 'is a file'}; "
                       "choose a new folder")
    gguf_dtype = None
    if args.format == "gguf":
        gguf_dtype = _gguf_options(args)
    model, tokenizer = _load_model(args)
    try:
        if gguf_dtype:
            from .gguf_export import export_gguf

            for path in export_gguf(model, tokenizer, out, dtype=gguf_dtype):
                print(path)
            return
        export_llava(model, tokenizer, out, vllm_names=args.vllm_names)
    except (ValueError, OSError) as error:
        raise CliError(f"could not export to {out}: {str(error).splitlines()[0]}") from None
    print(out)


def _gguf_options(args):
    """The GGUF files' dtype ("f32"/"f16"); the model is then loaded in that dtype on the CPU."""
    import importlib.util

    if args.vllm_names:
        raise CliError("--vllm-names belongs to --format llava")
    if args.load_in_4bit:
        raise CliError("--format gguf writes full-precision weights: drop --load-in-4bit and quantise "
                       "model.gguf with llama.cpp's llama-quantize")
    if args.dtype not in (None, *GGUF_DTYPES):
        raise CliError(f"--format gguf writes f32 or f16, not {args.dtype}")
    if importlib.util.find_spec("gguf") is None:
        raise CliError("--format gguf needs the gguf package: pip install 'llama3vision-min[gguf]'")
    args.dtype, args.device = GGUF_DTYPES[args.dtype or "f16"], args.device or "cpu"
    return "f32" if args.dtype == "float32" else "f16"


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "ask":
            ask(args)
        elif args.command == "export":
            export(args)
        sys.stdout.flush()
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the output was piped into a reader that stopped (``| head``): no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 1
    return 0


def main_entry():
    """Console-script entry point (``llama3vision-min ask ...``)."""
    raise SystemExit(main())
