"""llama3vision_min: a short, readable reimplementation of qresearch's llama-3-vision-alpha.

The model is the files of this folder, read in this order (each names the official code it mirrors):

1. ``prompt.py``      -- the Llama 3 chat prompt with ``<image>`` in the user turn
2. ``token_split.py`` -- ``tokenizer_image_token``: text -> ids with the -200 sentinel
3. ``image.py``       -- picture -> pixel values -> SigLIP features (``hidden_states[-2]``)
4. ``projector.py``   -- ``ProjectionModule``: Linear -> GELU -> Linear, 1152 -> 4096, and its file
5. ``splice.py``      -- ``process_tensors``: token embeddings + image features + attention mask
6. ``generation.py``  -- stop tokens and sampling defaults; ``chat.py`` -- multi-turn chat
7. ``model.py``       -- ``LlamaVision``: forward, ``answer_question``, placed on a device, saved
8. ``loading.py``     -- both checkpoint forms, read safely in one strict pass

(``constants.py`` names -200, -100 and ``<|eot_id|>``.) ``scratch/`` writes both towers out in plain
PyTorch (SigLIP and Llama 3, ``implementation="scratch"``); ``lens/`` looks inside a running model
(attention over the patches, the words the projector writes, occlusion, the logit lens). The other
subfolders are the workshop around the model: ``tools/`` (command line, LLaVA and GGUF exports, the
llama.cpp runner, notebook helpers), ``training/`` (the real-scale stage-1 trainer) and ``miniature/`` (the
tiny random stand-ins and the miniature trained offline). The original algorithm, transcribed, is
``llama3vision_original.py`` next to this folder.
"""

from .constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from .model import LlamaVision
from .projector import ProjectionModule, load_projector
from .prompt import build_chat_prompt, build_prompt
from .splice import SplicedBatch, process_tensors, splice_batch
from .token_split import tokenizer_image_token

__version__ = "0.1.0"


def load_mini(path=None, implementation="transformers"):
    """The shipped miniature ``(LlamaVision, tokenizer)`` (see ``llama3vision_min.miniature``); no network.

    ``implementation="scratch"`` gives it the from-scratch towers of ``llama3vision_min.scratch``.
    """
    from .miniature import CHECKPOINT_DIR
    from .miniature import load_mini as load

    return load(path or CHECKPOINT_DIR, implementation=implementation)


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "LlamaVision",
    "ProjectionModule",
    "SplicedBatch",
    "build_chat_prompt",
    "build_prompt",
    "load_mini",
    "load_projector",
    "process_tensors",
    "splice_batch",
    "tokenizer_image_token",
]
