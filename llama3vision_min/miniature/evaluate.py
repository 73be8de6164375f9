"""Exact-match evaluation on pictures from held-out seeds, through the public ``answer_questions``."""

import torch
from tqdm.auto import tqdm

from .world import HELD_OUT_START, QUESTION_TYPES, QUESTIONS, answer, render, scene


@torch.inference_mode()
def evaluate(model, tokenizer, n=500, start=HELD_OUT_START, questions=QUESTIONS, batch_size=125,
             progress=True):
    """Ask every question type about ``n`` pictures (seeds ``start`` .. ``start + n - 1``) and score exact
    matches.

    Greedy decoding, the answer decoded with ``skip_special_tokens=True`` and stripped. Each
    ``generate`` call holds one question type, so its prompts have one length and need no
    padding: the answers are the ones ``answer_question`` gives one picture at a time.
    Returns ``{"what": acc, "colour": acc, "shape": acc, "count": acc, "all": acc,
    "n_pictures": n, "errors": [(seed, question, expected, got), ...] (the first 20)}``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a number of pictures >= 1, got {n!r}")
    if start < HELD_OUT_START:
        raise ValueError(f"evaluation pictures must come from held-out seeds (>= {HELD_OUT_START}), "
                         f"got start={start}")
    seeds = list(range(start, start + n))
    scenes = [scene(seed) for seed in seeds]
    images = [render(s) for s in scenes]
    right = {question_type: 0 for question_type in QUESTION_TYPES}
    errors = []
    bar = tqdm(total=n * len(QUESTION_TYPES), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for question_type in QUESTION_TYPES:
        question = questions[question_type]
        for i in range(0, n, batch_size):
            batch = range(i, min(n, i + batch_size))
            ids = model.answer_questions([images[j] for j in batch], [question] * len(batch), tokenizer,
                                         do_sample=False, max_new_tokens=8)
            for j, row in zip(batch, ids):
                got = tokenizer.decode(row, skip_special_tokens=True).strip()
                expected = answer(scenes[j], question_type)
                if got == expected:
                    right[question_type] += 1
                elif len(errors) < 20:
                    errors.append((seeds[j], question, expected, got))
            bar.update(len(batch))
    bar.close()
    result = {question_type: right[question_type] / n for question_type in QUESTION_TYPES}
    result["all"] = sum(right.values()) / (n * len(QUESTION_TYPES))
    result["n_pictures"] = n
    result["errors"] = errors
    return result
