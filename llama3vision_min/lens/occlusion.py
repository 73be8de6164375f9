"""Does the answer need this part of the picture? Grey it out and see how much the answer's probability drops.

Attention maps show where the LLM reads; occlusion tests what the answer depends on (Zeiler & Fergus,
arXiv 1311.2901). Each patch of the picture, as the vision tower sees it (after resizing), is painted
mid-grey (0 after SigLIP's normalisation), the model re-run with the answer fixed, and the drop in the
answer's log-probability recorded. SigLIP's attention spreads every patch's content over the others, so
a single grey patch often changes little: a small drop is a finding, not a failure.
"""

import torch
import torch.nn.functional as F

from ..generation import stop_token_ids
from .attention import answer_tensor, grid_side, question_ids


@torch.no_grad()
def answer_log_prob(model, ids, image_features, n_answer):
    """log p(answer | picture, question) for each picture's features: the last ``n_answer`` of ``ids``
    (1-D: prompt, then answer) scored, summed over the answer's tokens. Returns (n_pictures,) floats."""
    batch = model.splice(ids.expand(image_features.shape[0], -1), image_features)  # the same text for each
    logits = model.text_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    log_probs = F.log_softmax(logits[:, -n_answer - 1 : -1].float(), dim=-1)  # (n, n_answer, vocab)
    targets = ids[-n_answer:].to(log_probs.device)[None, :, None].expand(log_probs.shape[0], -1, -1)
    return log_probs.gather(-1, targets)[..., 0].sum(-1).cpu()


@torch.no_grad()
def occlusion_map(model, tokenizer, image, question, answer_ids=None, block=1, batch_size=16):
    """The (grid, grid) drop in the answer's log-probability when each patch of the picture is greyed out.

    ``answer_ids``: the answer to score (default: the model's own greedy answer, stop token excluded).
    ``block``: grey ``block`` x ``block`` patches at a time (the real model's 27 x 27 grid takes 729 runs
    at ``block=1``, 81 at ``block=3``); every patch of a block gets the block's drop. Positive: the patch
    helped the answer. Float32, on the CPU.
    """
    for name, value in (("block", block), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    if answer_ids is None:
        answer_ids = model.answer_question(image, question, tokenizer, do_sample=False,
                                           max_new_tokens=32).tolist()
        while answer_ids and answer_ids[-1] in stop_token_ids(tokenizer):
            answer_ids.pop()
    answer_ids = answer_tensor(answer_ids)
    if answer_ids.numel() == 0:
        raise ValueError("expected an answer of at least one token to score, got none")
    ids = question_ids(tokenizer, question, answer_ids)[None]  # (1, L + n_answer)
    pixels = model.preprocess([image])  # (1, 3, S, S)
    features = model.encode_images(pixels)  # (1, P, width)
    grid = grid_side(features.shape[1])
    step = pixels.shape[-1] // grid  # pixels per patch side
    baseline = answer_log_prob(model, ids[0], features, len(answer_ids))[0]
    corners = [(r, c) for r in range(0, grid, block) for c in range(0, grid, block)]
    drops = torch.zeros(grid, grid)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        greyed = pixels.repeat(len(chunk), 1, 1, 1)  # (n, 3, S, S)
        for i, (r, c) in enumerate(chunk):
            greyed[i, :, r * step : (r + block) * step, c * step : (c + block) * step] = 0.0  # mid-grey
        scores = answer_log_prob(model, ids[0], model.encode_images(greyed), len(answer_ids))
        for (r, c), score in zip(chunk, scores):
            drops[r : r + block, c : c + block] = baseline - score
    return drops
