"""Pick what the notebooks run on: the real model on a GPU with the Hub, the offline stand-ins otherwise.

One variable overrides the choice: ``LLAMA3VISION_BACKEND`` = ``real``, ``mini``, ``tiny`` or
``auto`` (the default). ``auto`` looks for a CUDA GPU first and only then asks whether the
Hugging Face Hub answers, so an offline CPU machine never tries the network. Offline it takes
the shipped miniature, or the tiny random stand-in where no miniature is shipped.

``real`` on a GPU loads Llama 3 in 4-bit (it fits a free Colab T4); on a machine without one it loads
the real model on the CPU in bfloat16 where the CPU computes it, else float32 (about 17 GB or 34 GB
of memory: slow, but it runs). With ``HF_HUB_OFFLINE=1`` and the fake Hub of ``tests/fake_hub.py``
in ``HF_HOME``, ``real`` rehearses the whole real path offline.
"""

import os
from dataclasses import dataclass
from pathlib import Path

BACKEND_VARIABLE = "LLAMA3VISION_BACKEND"
REAL_LLM = "unsloth/llama-3-8b-Instruct"
REAL_VISION = "google/siglip-so400m-patch14-384"
REAL_PROJECTOR = "qresearch/llama-3-vision-alpha"
PHOTO = Path(__file__).resolve().parent / "photos" / "chelsea_the_cat.jpg"
"""The photograph the notebooks show the real model (CC0, from scikit-image; see photos/README.md)."""


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


def load_real_model(llm=REAL_LLM):
    """The real model in the alpha form with ``llm`` as its LLM: ``(LlamaVision, where it runs, in words)``.

    On a GPU the LLM is loaded in 4-bit (about 7.7 GB in all: a free Colab T4 holds one such model,
    not two); without one, on the CPU in the loader's choice of bfloat16 or float32.
    """
    import torch

    from ..model import LlamaVision

    if torch.cuda.is_available():
        model = LlamaVision.from_alpha(llm, REAL_VISION, REAL_PROJECTOR, dtype=torch.float16, device="cuda",
                                       load_in_4bit=True)
        return model, "4-bit, on the GPU"
    model = LlamaVision.from_alpha(llm, REAL_VISION, REAL_PROJECTOR, device="cpu")
    return model, f"{str(model.text_model.dtype).removeprefix('torch.')}, on the CPU"


def load_backend(choice=None):
    """Load the chosen backend: ``Backend(name, model, tokenizer, description)``."""
    name = choose_backend(choice)
    if name == "real":
        from transformers import AutoTokenizer

        model, where = load_real_model()
        tokenizer = AutoTokenizer.from_pretrained(REAL_LLM)
        return Backend(name, model, tokenizer, f"Llama-3-8B-Instruct ({where}) + SigLIP so400m + the official projector")
    if name == "mini":
        from ..miniature import load_mini

        model, tokenizer = load_mini()
        return Backend(name, model, tokenizer, "the shipped miniature (trained offline on coloured shapes)")
    from ..miniature.stand_ins import load_tiny

    model, tokenizer = load_tiny()
    return Backend(name, model, tokenizer, "the tiny random stand-in (answers noise)")
