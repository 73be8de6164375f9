"""A miniature world where the whole llama-3-vision-alpha recipe trains on a laptop CPU in minutes.

* ``sample(seed) -> (PIL.Image, question, answer)``: one labelled picture of coloured shapes
  (see ``world.py`` for the pictures and what each question means).
* ``train_vision`` / ``train_language`` / ``train_projector`` / ``finetune_language``:
  stages A to D (see ``train.py``); ``train_all`` runs them and ships the result
  (``python -m llama3vision_min.shapes train``).
* ``evaluate(model, tokenizer, n)``: exact-match accuracy per question type on held-out pictures.
* ``load_mini() -> (LlamaVision, tokenizer)``: the miniature shipped in ``llama3vision_min/mini``.
"""

from .evaluate import evaluate
from .pipeline import MINI_DIR, load_mini, train_all
from .train import Recipe, finetune_language, train_language, train_projector, train_vision
from .world import HELD_OUT_START, QUESTION_TYPES, QUESTIONS, answer, render, sample, scene

__all__ = [
    "HELD_OUT_START",
    "MINI_DIR",
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
