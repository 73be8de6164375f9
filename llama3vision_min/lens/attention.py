"""Where the LLM looks: the attention from the position that predicts the answer to the picture's rows.

The prompt's last position (the ``\\n\\n`` after ``assistant``) is the one whose output becomes the first
answer token. Its attention weights over the spliced sequence say, layer by layer and head by head, how
much of each position's value vector it mixes in. Restricted to the picture's rows and averaged, they
give a (grid, grid) map over the patches -- a picture of where the LLM reads, not a proof of why it answers
(SigLIP's own attention has already mixed the picture into every patch; ``occlusion.occlusion_map`` tests
that directly).
"""

import contextlib
from dataclasses import dataclass

import torch

from ..constants import IMAGE_TOKEN_INDEX
from ..image import RECORDING
from ..prompt import chat_segments
from ..scratch.llama import LlamaLM
from ..token_split import prompt_ids


@dataclass
class Prompt:
    """One question about one picture, spliced: what the LLM reads, and where the picture lies in it."""

    ids: torch.Tensor  # (1, L) with one -200
    inputs_embeds: torch.Tensor  # (1, L - 1 + P, width)
    attention_mask: torch.Tensor  # (1, L - 1 + P)
    image_rows: slice  # the P rows of the picture in inputs_embeds
    grid: int  # P = grid * grid patches


def question_ids(tokenizer, question, answer_ids=None):
    """(L,) ids of the chat prompt for ``question`` with the picture's -200 (and the answer's ids after
    it)."""
    ids = prompt_ids(chat_segments([(question, None)]), tokenizer)  # (L,)
    if answer_ids is not None:
        ids = torch.cat([ids, answer_tensor(answer_ids)])
    return ids


def answer_tensor(answer_ids):
    """``answer_ids`` (a list or 1-D tensor of token ids) as a (n,) long tensor on the CPU; anything else --
    fractions, a 2-D batch, booleans -- is refused, not truncated or flattened."""
    answer = torch.as_tensor(answer_ids) if not isinstance(answer_ids, (str, bytes)) else None
    if answer is not None and answer.dim() == 1 and answer.numel() == 0:
        return torch.zeros(0, dtype=torch.long)  # nothing to score: the caller says so
    if answer is None or answer.dim() != 1 or answer.is_floating_point() or answer.is_complex() \
            or answer.dtype == torch.bool:
        raise ValueError(f"answer_ids must be a list or 1-D tensor of token ids, got {answer_ids!r:.80}")
    return answer.long().cpu()


def spliced_prompt(model, tokenizer, image, question):
    """The prompt for ``question`` about ``image``, spliced, and where the picture lies in it."""
    (ids,), batch = model.prepare([[(question, None)]], [image], tokenizer)  # ids (L,) with one -200
    start, patches = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0]), batch.inputs_embeds.shape[1] - len(ids) + 1
    return Prompt(ids[None], batch.inputs_embeds, batch.attention_mask, slice(start, start + patches),
                  grid_side(patches))


def grid_side(patches):
    """The side of the square grid of ``patches`` patches (729 -> 27)."""
    side = int(round(patches**0.5))
    if side * side != patches:
        raise ValueError(f"expected a square grid of patches, got {patches} image rows")
    return side


@contextlib.contextmanager
def eager_attention(text_model):
    """transformers' LLM with its plain ("eager") attention for the block, which can return its weights
    (SDPA and flash attention cannot); the from-scratch ``LlamaLM`` returns them as it is."""
    with RECORDING:  # a second thread would switch the attention back under the first
        before = getattr(text_model.config, "_attn_implementation", None)
        if isinstance(text_model, LlamaLM) or before in (None, "eager"):
            yield text_model
            return
        text_model.set_attn_implementation("eager")
        try:
            yield text_model
        finally:
            text_model.set_attn_implementation(before)


@torch.no_grad()
def patch_attention(model, tokenizer, image, question, layers=None, heads=None):
    """The (grid, grid) attention map of the answer's first position over the picture's patches.

    The attention weights from the prompt's last position to the image rows, averaged over ``layers``
    and ``heads`` (indices; default: all), then renormalised to sum to 1 over the patches. Patches are
    in reading order: entry [r, c] is the patch in row r, column c of the picture (27 x 27 for the real
    model, 8 x 8 for the miniature). Float32, on the CPU.
    """
    prompt = spliced_prompt(model, tokenizer, image, question)
    with eager_attention(model.text_model) as text_model:
        attentions = text_model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                                output_attentions=True).attentions  # n_layers x (1, heads, T, T)
    if not attentions or attentions[0] is None:
        raise ValueError(f"{type(model.text_model).__name__} returned no attention weights")
    rows = torch.stack([a[0, :, -1, prompt.image_rows].float().cpu()
                        for a in attentions])  # (layers, heads, P)
    rows = rows[_select(layers, rows.shape[0], "layers")][:, _select(heads, rows.shape[1], "heads")]
    weights = rows.mean(dim=(0, 1))  # (P,)
    return (weights / weights.sum()).reshape(prompt.grid, prompt.grid)


def _select(indices, count, what):
    """``indices`` (None: all) as a list, each checked to lie in range(count)."""
    if indices is None:
        return list(range(count))
    indices = [indices] if isinstance(indices, int) else list(indices)
    bad = [i for i in indices if not isinstance(i, int) or not -count <= i < count]
    if not indices or bad:
        raise ValueError(f"{what} must be indices in range({count}) (negative from the end), got {indices!r}")
    return indices
