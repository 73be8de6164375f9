"""Pick what the notebooks run on: the real model on a GPU with the Hub, the offline stand-ins otherwise.

One variable overrides the choice: ``LLAMA3VISION_BACKEND`` = ``real``, ``mini``, ``tiny`` or
``auto`` (the default). ``auto`` looks for a CUDA GPU first and only then asks whether the
Hugging Face Hub answers, so an offline CPU machine never tries the network. Offline it takes
the shipped miniature, or the tiny random stand-in where no miniature is shipped.
"""

import os
from dataclasses import dataclass

BACKEND_VARIABLE = "LLAMA3VISION_BACKEND"
REAL_LLM = "unsloth/llama-3-8b-Instruct"
REAL_VISION = "google/siglip-so400m-patch14-384"
REAL_PROJECTOR = "qresearch/llama-3-vision-alpha"


@dataclass
class Backend:
    name: str  # "real", "mini" or "tiny"
    model: object  # a LlamaVision
    tokenizer: object
    description: str


def mini_available():
    """True when the trained miniature is shipped inside the package (llama3vision_min/miniature/checkpoint/)."""
    from ..miniature import CHECKPOINT_DIR

    return (CHECKPOINT_DIR / "config.json").is_file()


def hub_answers(timeout=5.0):
    """True when huggingface.co answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"https://huggingface.co/api/models/{REAL_PROJECTOR}", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False
    return True


def choose_backend(choice=None):
    """The backend name for ``choice`` (or the variable, or ``auto``)."""
    import torch

    choice = (choice or os.environ.get(BACKEND_VARIABLE) or "auto").lower()
    if choice not in ("auto", "real", "mini", "tiny"):
        raise ValueError(f"{BACKEND_VARIABLE} must be auto, real, mini or tiny, got {choice!r}")
    if choice == "auto":
        if torch.cuda.is_available() and hub_answers():
            return "real"
        return "mini" if mini_available() else "tiny"
    return choice


def load_backend(choice=None):
    """Load the chosen backend: ``Backend(name, model, tokenizer, description)``."""
    name = choose_backend(choice)
    if name == "real":
        import torch
        from transformers import AutoTokenizer

        from ..model import LlamaVision

        model = LlamaVision.from_alpha(REAL_LLM, REAL_VISION, REAL_PROJECTOR, dtype=torch.float16,
                                       device="cuda", load_in_4bit=True)
        tokenizer = AutoTokenizer.from_pretrained(REAL_LLM)
        return Backend(name, model, tokenizer, "Llama-3-8B-Instruct (4-bit) + SigLIP so400m + the official projector")
    if name == "mini":
        from ..miniature import load_mini

        model, tokenizer = load_mini()
        return Backend(name, model, tokenizer, "the shipped miniature (trained offline on coloured shapes)")
    from ..miniature.stand_ins import load_tiny

    model, tokenizer = load_tiny()
    return Backend(name, model, tokenizer, "the tiny random stand-in (answers noise)")
