"""Pick what the notebooks run on, say why, and load only the parts a notebook uses.

One variable overrides the choice: ``LLAMA3VISION_BACKEND`` = ``real``, ``mini``, ``tiny`` or
``auto`` (the default). ``auto`` looks for a CUDA GPU first and only then asks whether the
Hugging Face Hub answers, so an offline CPU machine never tries the network. Offline it takes
the shipped miniature, or the tiny random stand-in where no miniature is shipped.

``real`` on a GPU loads Llama 3 in 4-bit (it fits a free Colab T4); on a machine without one it loads
the real model on the CPU in bfloat16 where the CPU computes it, else float32 (about 17 GB or 34 GB
of memory: slow, but it runs). With ``HF_HUB_OFFLINE=1`` and the fake Hub of ``tests/fake_hub.py``
in ``HF_HOME``, ``real`` rehearses the whole real path offline.

Each Colab notebook runs on a fresh machine, so every download is paid again: ``load_backend(parts=...)``
loads only what the notebook uses -- ``("vision", "llm")`` the whole model, ``("vision",)`` SigLIP and the
projector (3.5 GB instead of about 20 GB), ``()`` nothing -- and the same parts on every backend, so a
notebook that reaches for a part it did not ask for fails offline too, where CI sees it.
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

PARTS = ("vision", "llm")
"""What ``load_backend`` can load: the vision tower with the projector, and the LLM with its tokenizer."""

HOW_TO_GET_THE_REAL_MODEL = ("for the real model: on Colab, Runtime > Change runtime type > T4 GPU, then "
                             f"Run all; elsewhere a CUDA GPU with the Hub, or {BACKEND_VARIABLE}=real")
HOW_TO_GET_THE_MINIATURE = f"for the offline miniature: {BACKEND_VARIABLE}=mini before the backend cell"


@dataclass
class Backend:
    name: str  # "real", "mini" or "tiny"
    model: object  # a LlamaVision with the parts asked for (text_model None without "llm"), or None
    tokenizer: object  # the LLM's tokenizer, or None without "llm"
    description: str  # what was loaded, in words
    reason: str  # why this backend was chosen

    def picture(self, seed=10_000_003):
        """``(picture, question, expected answer)`` to ask this backend's model about.

        The real model sees the bundled photograph (Chelsea the cat, 451 x 300) -- never a toy picture; the
        miniature and the tiny stand-in see the miniature's held-out picture ``seed``.
        """
        if self.name == "real":
            from PIL import Image

            return Image.open(PHOTO).convert("RGB"), "what is this?", "a cat"
        from ..miniature import sample

        return sample(seed)

    def report(self):
        """What the backend cell prints: which backend, why, the GPU, and how to switch."""
        switch = HOW_TO_GET_THE_MINIATURE if self.name == "real" else HOW_TO_GET_THE_REAL_MODEL
        return "\n".join([f"backend: {self.name} -- {self.description}", f"why: {self.reason}",
                          f"GPU: {gpu_in_words()}", f"to switch: {switch}"])


def gpu_in_words():
    """The GPU's name and free memory, or why there is none."""
    import torch

    if not torch.cuda.is_available():
        return "none (torch.cuda.is_available() is False)"
    free, total = torch.cuda.mem_get_info()
    return f"{torch.cuda.get_device_name()}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"


def mini_available():
    """True when the trained miniature is shipped inside the package
    (llama3vision_min/miniature/checkpoint/)."""
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
    """``(name, reason)``: the backend for ``choice`` (or the variable, or ``auto``), and why, in words."""
    import torch

    given = choice or os.environ.get(BACKEND_VARIABLE) or "auto"
    name = given.lower()
    if name not in ("auto", "real", "mini", "tiny"):
        raise ValueError(f"{BACKEND_VARIABLE} must be auto, real, mini or tiny, got {given!r}")
    if name != "auto":
        return name, (f"asked for {name!r}" if choice else f"forced by {BACKEND_VARIABLE}={given}")
    if not torch.cuda.is_available():
        reason = "auto: this runtime has no GPU, so the real model is not tried"
    elif not hub_answers():
        reason = "auto: a GPU, but the Hugging Face Hub does not answer (offline, or HF_HUB_OFFLINE is set)"
    else:
        return "real", "auto: a GPU and the Hugging Face Hub are both here"
    if mini_available():
        return "mini", reason
    return "tiny", reason + "; no trained miniature is shipped, so the tiny random stand-in"


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


def load_real_vision():
    """SigLIP's vision tower and the official projector, without the LLM: ``(LlamaVision, in words)``.

    Float16 on a GPU, as the original runs; float32 on a CPU. ``text_model`` is None.
    """
    import torch
    from huggingface_hub import hf_hub_download

    from ..loading import load_vision_tower
    from ..model import LlamaVision
    from ..projector import load_projector

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    vision_model = load_vision_tower(REAL_VISION).to(device=device, dtype=dtype)
    projector = load_projector(hf_hub_download(REAL_PROJECTOR, "mm_projector.bin"))  # 43 MB
    projector = projector.to(device=device, dtype=dtype)
    where = f"{str(dtype).removeprefix('torch.')}, on the {'GPU' if device == 'cuda' else 'CPU'}"
    return LlamaVision(vision_model=vision_model, text_model=None, mm_projector=projector), where


def _keep(model, parts):
    """``model`` with only ``parts``: the LLM dropped without "llm", nothing without "vision"."""
    from ..model import LlamaVision

    if "vision" not in parts:
        return None
    if "llm" not in parts:
        return LlamaVision(vision_model=model.vision_model, text_model=None, mm_projector=model.mm_projector)
    return model


def load_backend(choice=None, parts=PARTS):
    """Load the chosen backend's ``parts``: ``Backend(name, model, tokenizer, description, reason)``.

    ``parts``: ``("vision", "llm")`` (the default) the whole model and its tokenizer; ``("vision",)``
    SigLIP and the projector alone (``model.text_model`` is None, no tokenizer); ``()`` nothing.
    """
    parts = tuple(parts)
    if not set(parts) <= set(PARTS) or ("llm" in parts and "vision" not in parts):
        raise ValueError(f"parts must be ('vision', 'llm'), ('vision',) or (), got {parts!r}")
    name, reason = choose_backend(choice)
    if name == "real":
        if "llm" in parts:
            from transformers import AutoTokenizer

            model, where = load_real_model()
            return Backend(name, model, AutoTokenizer.from_pretrained(REAL_LLM, trust_remote_code=False),
                           f"Llama-3-8B-Instruct ({where}) + SigLIP so400m + the official projector", reason)
        if "vision" in parts:
            model, where = load_real_vision()
            what = f"SigLIP so400m + the official projector ({where}); no LLM"
            return Backend(name, model, None, what, reason)
        return Backend(name, None, None, "nothing loaded yet (the notebook loads what it needs itself)",
                       reason)
    if name == "mini":
        from ..miniature import load_mini

        model, tokenizer = load_mini()
        what = "the shipped miniature (trained offline on coloured shapes)"
    else:
        from ..miniature.stand_ins import load_tiny

        model, tokenizer = load_tiny()
        what = "the tiny random stand-in (answers noise)"
    if "llm" not in parts:
        what += ": its vision tower and projector, no LLM" if parts else ": nothing loaded yet"
    return Backend(name, _keep(model, parts), tokenizer if "llm" in parts else None, what, reason)
