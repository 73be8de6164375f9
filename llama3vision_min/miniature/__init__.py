"""The miniature: the whole llama-3-vision-alpha recipe, trained from scratch on a laptop CPU in minutes.

A world of coloured shapes small enough that a tiny SigLIP tower, a tiny Llama 3 and a projector
between them train in about eight minutes on two cores -- and then answer, like the real model,
questions about pictures they have never seen. Import the miniature from here:

* ``sample(seed) -> (PIL.Image, question, answer)``; ``scene(seed)``, ``render(scene)``, ``answer``,
  ``QUESTIONS``, ``QUESTION_TYPES``, ``HELD_OUT_START``: the world (``world.py``);
* ``load_mini() -> (LlamaVision, tokenizer)``: the shipped, trained miniature (``checkpoint/``, with
  its model card ``checkpoint/README.md``);
* ``evaluate(model, tokenizer, n)``: exact-match accuracy per question type on held-out pictures;
* ``Recipe`` and ``train_vision`` / ``train_language`` / ``train_projector`` / ``finetune_language``:
  stages A to D (``stages.py``); ``train_all`` runs them and ships the result
  (``python -m llama3vision_min.miniature train --ship``, or ``make mini``).

The files, in the order they build on each other: ``stand_ins.py`` (random, untrained stand-ins of
the real towers at any size -- the tests' tiny models -- and the one builder of their configs),
``world.py``, ``text.py`` (the miniature's tokenizer and the token ids of its dialogs), ``stages.py``,
``evaluate.py``, ``model_card.py``, ``run.py``.
"""

from .evaluate import evaluate
from .run import CHECKPOINT_DIR, load_mini, train_all
from .stages import Recipe, finetune_language, train_language, train_projector, train_vision
from .world import HELD_OUT_START, QUESTION_TYPES, QUESTIONS, answer, render, sample, scene

__all__ = [
    "CHECKPOINT_DIR",
    "HELD_OUT_START",
    "QUESTIONS",
    "QUESTION_TYPES",
    "Recipe",
    "answer",
    "evaluate",
    "finetune_language",
    "load_mini",
    "render",
    "sample",
    "scene",
    "train_all",
    "train_language",
    "train_projector",
    "train_vision",
]
