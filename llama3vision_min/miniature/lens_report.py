"""The lens measured on the miniature: does the LLM look at the objects, and which words does the
projector write?

In the miniature's world we know exactly where every object is (``world.object_mask``), so the maps of
``llama3vision_min.lens`` can be scored instead of admired. For held-out pictures and each question type:

* localisation -- how often a map's top patch lies on an object, next to chance (the share of patches
  that do). Two readings of "on an object": the patch *touches* one (any object pixel among its own),
  or a *quarter* of its pixels or more are object;
* words -- what ``patch_words`` reads on object patches and on the background, and whether the colour,
  shape and count words it finds are the picture's.
"""

from collections import Counter

import numpy as np
import torch

from ..lens import occlusion_map, patch_attention, patch_words
from .world import COLOURS, HELD_OUT_START, QUESTIONS, SHAPES, object_mask, render, scene

METHODS = {"attention": patch_attention, "occlusion": occlusion_map}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def patch_cover(picture_scene, grid):
    """(grid, grid): the share of each patch's pixels that belong to an object."""
    mask = torch.from_numpy(np.array(object_mask(picture_scene), dtype=np.float32))  # (64, 64)
    step = mask.shape[0] // grid
    return mask.reshape(grid, step, grid, step).mean(dim=(1, 3))


def localisation(model, tokenizer, n=200, methods=("attention",), start=HELD_OUT_START, **method_kwargs):
    """How often each method's top patch lies on an object, per question type, over ``n`` held-out pictures.

    Returns ``{method: {question_type: {"touches": share, "quarter": share}, ..., "chance": {...}}}``:
    the shares of pictures whose top patch touches an object / is at least a quarter object, and for
    "chance" the mean share of patches that do (what a patch picked at random would score).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive whole number, got {n!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {sorted(METHODS)}, got {unknown}")
    hits = {m: {q: {"touches": [], "quarter": []} for q in QUESTIONS} for m in methods}
    chance = {"touches": [], "quarter": []}
    for seed in range(start, start + n):
        picture_scene = scene(seed)
        picture, cover = render(picture_scene), None
        for method in methods:
            for question_type, question in QUESTIONS.items():
                heat = METHODS[method](model, tokenizer, picture, question, **method_kwargs)  # (grid, grid)
                cover = patch_cover(picture_scene, heat.shape[0]) if cover is None else cover
                top = cover.flatten()[int(heat.flatten().argmax())]
                hits[method][question_type]["touches"].append(bool(top > 0))
                hits[method][question_type]["quarter"].append(bool(top >= 0.25))
        chance["touches"].append(float((cover > 0).float().mean()))
        chance["quarter"].append(float((cover >= 0.25).float().mean()))
    chance = {k: float(np.mean(v)) for k, v in chance.items()}
    return {m: {**{q: {k: float(np.mean(v)) for k, v in by.items()} for q, by in hits[m].items()},
                "chance": chance}
            for m in methods}


def word_statistics(model, tokenizer, n=200, k=3, start=HELD_OUT_START):
    """What ``patch_words`` reads on ``n`` held-out pictures (words stripped of their leading space).

    Returns a dict: ``top_word_on_objects`` and ``top_word_on_background`` (Counters of the nearest word
    of patches at least a quarter object / with no object pixel), ``three_on_objects_by_count`` (the
    share of object patches whose nearest word is "three", by the true count), and per-patch shares of
    object patches whose ``k`` words hold the right / a wrong shape word, and per-picture shares whose
    words (all patches) hold the right / a wrong colour word.
    """
    on_objects, on_background = Counter(), Counter()
    three = {count: [] for count in COUNT_WORDS}
    shape_right, shape_wrong, colour_right, colour_wrong = [], [], [], []
    for seed in range(start, start + n):
        picture_scene = scene(seed)
        words = [[w.strip() for w in row]
                 for row in patch_words(model, tokenizer, render(picture_scene), k=k)]
        cover = patch_cover(picture_scene, int(round(len(words) ** 0.5))).flatten()
        objects = [row for row, c in zip(words, cover) if c >= 0.25]
        on_objects.update(row[0] for row in objects)
        on_background.update(row[0] for row, c in zip(words, cover) if c == 0)
        three[picture_scene.count] += [row[0] == "three" for row in objects]
        for row in objects:
            shapes = {_shape(w) for w in row} - {None}
            shape_right.append(picture_scene.shape in shapes)
            shape_wrong.append(bool(shapes - {picture_scene.shape}))
        colours = {w for row in words for w in row if w in COLOURS}
        colour_right.append(picture_scene.colour in colours)
        colour_wrong.append(bool(colours - {picture_scene.colour}))
    return {
        "top_word_on_objects": on_objects,
        "top_word_on_background": on_background,
        "three_on_objects_by_count": {c: float(np.mean(v)) for c, v in three.items() if v},
        "object_patches_with_right_shape": float(np.mean(shape_right)),
        "object_patches_with_wrong_shape": float(np.mean(shape_wrong)),
        "pictures_with_right_colour": float(np.mean(colour_right)),
        "pictures_with_wrong_colour": float(np.mean(colour_wrong)),
    }


def _shape(word):
    """The shape a word names ("crosses" -> "cross"), or None."""
    return next((shape for shape in SHAPES if word in (shape, shape + "s", shape + "es")), None)


def localisation_table(result):
    """``localisation``'s result as a markdown table: question types by methods, then chance."""
    methods = list(result)
    lines = ["| question | " + " | ".join(f"{m}: touches | {m}: quarter" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]
    for question_type, question in QUESTIONS.items():
        cells = [f"{result[m][question_type][k]:.0%}" for m in methods for k in ("touches", "quarter")]
        lines.append(f"| {question} | " + " | ".join(cells) + " |")
    chance = [f"{result[m]['chance'][k]:.0%}" for m in methods for k in ("touches", "quarter")]
    lines.append("| *a random patch* | " + " | ".join(chance) + " |")
    return "\n".join(lines)
