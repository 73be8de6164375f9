"""Which words the projector writes: each projected patch read back against the LLM's vocabulary.

The projector maps SigLIP's patch features into the space of the LLM's input embeddings -- the space in
which every word it knows has a vector. Nothing forces a projected patch to sit near any word's vector
(LLaVA's authors call them "soft tokens"), yet reading each patch's nearest words shows what the frozen
LLM is handed: on the miniature, the scene's own words. ``logit_lens`` asks the same question after each
decoder layer, through the LLM's output head (nostalgebraist's "logit lens", 2020).
"""

import torch
import torch.nn.functional as F

from ..image import RECORDING
from .attention import spliced_prompt


@torch.no_grad()
def patch_words(model, tokenizer, image, k=3):
    """For each patch, in reading order, the ``k`` tokens whose input embeddings are nearest in cosine.

    Returns a list of grid * grid lists of ``k`` decoded strings, nearest first (every token of the
    vocabulary is a candidate, special tokens included).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive whole number, got {k!r}")
    projected = model.encode_images(model.preprocess([image]))[0]  # (P, width): the picture's soft tokens
    vocabulary = model.text_model.get_input_embeddings().weight  # (vocab, width)
    k = min(k, vocabulary.shape[0])
    similarity = (F.normalize(projected.float(), dim=-1)
                  @ F.normalize(vocabulary.float(), dim=-1).T)  # (P, vocab)
    nearest = similarity.topk(k, dim=-1).indices.cpu()  # (P, k)
    return [[tokenizer.decode([token]) for token in row] for row in nearest.tolist()]


@torch.no_grad()
def logit_lens(model, tokenizer, image, question, k=1):
    """The LLM's own reading of each image row after every layer: final norm and output head applied there.

    Returns a list with one entry per depth -- the spliced input, then each decoder layer's output (the
    last one is what the model's head really reads) -- each a list of grid * grid lists of the ``k``
    most likely next tokens, decoded, for the patches in reading order.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive whole number, got {k!r}")
    prompt = spliced_prompt(model, tokenizer, image, question)
    text_model = model.text_model
    with RECORDING:
        states = text_model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                            output_hidden_states=True).hidden_states  # (n_layers + 1) x (1, T, width)
    norm, head = text_model.model.norm, text_model.get_output_embeddings()
    out = []
    for depth, state in enumerate(states):
        rows = state[0, prompt.image_rows]  # (P, width)
        if depth < len(states) - 1:  # transformers returns the last one already normalised
            rows = norm(rows)
        top = head(rows).topk(k, dim=-1).indices.cpu()  # (P, k)
        out.append([[tokenizer.decode([token]) for token in row] for row in top.tolist()])
    return out
