"""The original llama-3-vision-alpha algorithm, transcribed: read this file first.

This is the whole model as its authors run it, in one file of plain functions: the prompt,
the token split, the picture through SigLIP, the projector, the splice, generation, the chat
script's follow-up turn and the projector checkpoint's keys. Every step takes the parts of the
model as arguments, so it runs on the real towers and on tiny random ones alike.

It is written from the published facts about the official code -- ``modeling_llamavision.py``
of https://huggingface.co/qresearch/llama-3-vision-alpha-hf and the script of
https://huggingface.co/qresearch/llama-3-vision-alpha, which reuse LLaVA's helpers
(https://github.com/haotian-liu/LLaVA) -- and it deliberately imports nothing of
``llama3vision_min``: a bug shared by both would hide a parity failure. It is the "original"
side of the parity tests (``tests/parity/test_parity_reference.py``), of the benchmark
(``benchmarks/bench.py``) and of the notebooks' side-by-side cells.

    step   here                          in llama3vision_min
    1      build_prompt                  prompt.py
    2      tokenizer_image_token         token_split.py
    3      (inside answer_question)      image.py
    4      ReferenceProjector            projector.py
    5      process_tensors               splice.py
    6      generation_defaults,          generation.py, model.py
           answer_question               (steps 1-6 end to end)
    6      follow_up_turn                chat.py (step 6, continued; it keeps the picture, this drops it)
    8      load_alpha_projector_state    loading.py
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"

# Step 1: Llama 3 chat format, image first in the user turn.
PROMPT_TEMPLATE = (
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "<image>{question}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

# Not in the reference facts: scripts derived from the original use 2000.
DEFAULT_MAX_NEW_TOKENS = 2000


def build_prompt(question: str) -> str:
    """Step 1 (prompt): fill the original chat template with the question."""
    return PROMPT_TEMPLATE.format(question=question)


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    """Step 2 (token split), the LLaVA-style helper of the ``-hf`` model.

    Each chunk between ``<image>`` markers is tokenised with default special
    tokens (so each begins with BOS). The chunks are interleaved with a
    separator; when the first chunk starts with BOS, that BOS is emitted once
    and the first token (the BOS) of every chunk and separator copy is skipped
    (the ``offset``), which keeps chunk 0 whole and drops later chunks' BOS.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]

    def interleave(items, sep):
        out = []
        for item in items:
            out.append(item)
            out.append(sep)
        return out[:-1]

    input_ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for piece in interleave(chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(piece[offset:])

    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


class ReferenceProjector(nn.Module):
    """Step 4 (projection): Linear(a, b) -> exact GELU -> Linear(b, b), held in ``self.model``."""

    def __init__(self, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(mm_hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, x):
        return self.model(x)


def process_tensors(input_ids, image_features, embedding_layer):
    """Step 5 (splice), the ``-hf`` model's ``process_tensors``.

    Finds the first -200 (row 0; batch of one only, no sentinel -> IndexError),
    embeds the ids before/after it, concatenates ``[before, image, after]`` on
    dim 1, and returns it with an all-ones long attention mask.
    """
    split_index = (input_ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[1][0]
    before = embedding_layer(input_ids[:, :split_index]).to(image_features.device)
    after = embedding_layer(input_ids[:, split_index + 1 :]).to(image_features.device)
    embeds = torch.cat([before, image_features, after], dim=1)
    attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=image_features.device)
    return embeds, attention_mask


def generation_defaults(tokenizer):
    """Step 6 (generation settings): sample at temperature 0.2, stop on eos or ``<|eot_id|>``, pad with eos.

    The scripts set ``tokenizer.eos_token = "<|eot_id|>"``; passing both ids is the same stop rule
    without changing the tokenizer. The caller's keywords override these.
    """
    return dict(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")],
        pad_token_id=tokenizer.eos_token_id,
        do_sample=True,
        temperature=0.2,
    )


def answer_question(
    image,
    question,
    tokenizer,
    *,
    vision_model,
    text_model,
    mm_projector,
    processor,
    image_size,
    **generate_kwargs,
):
    """Steps 1-6 end to end: the ``-hf`` model's ``answer_question``.

    Returns the generated ids ``[0]`` (1-D; with only ``inputs_embeds`` given,
    ``generate`` returns the new tokens alone). ``generate_kwargs`` override
    the original defaults. The tokenizer is not mutated.
    """
    embed_layer = text_model.get_input_embeddings()
    input_ids = tokenizer_image_token(build_prompt(question), tokenizer, return_tensors="pt")
    input_ids = input_ids.unsqueeze(0).to(embed_layer.weight.device)

    image = image.convert("RGB")
    pixel_values = processor(
        images=image,
        return_tensors="pt",
        do_resize=True,
        size={"height": image_size, "width": image_size},
    )["pixel_values"]
    pixel_values = pixel_values.to(dtype=vision_model.dtype, device=vision_model.device)

    kwargs = {**generation_defaults(tokenizer), **generate_kwargs}
    with torch.inference_mode():
        outputs = vision_model(pixel_values, output_hidden_states=True)
        features = outputs.hidden_states[-2]
        projected = mm_projector(features)
        embeds, attention_mask = process_tensors(input_ids, projected, embed_layer)
        generated = text_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
    return generated[0]


def follow_up_turn(text_model, tokenizer, history, question, **generate_kwargs):
    """Step 6, continued (chat): the original chat script's follow-up turn.

    The whole conversation so far (``history``: ``[(question, answer), ...]``) is written
    out again as Llama 3 chat text *without* the ``<image>`` placeholder, tokenised in one
    piece (the tokenizer adds BOS) and generated from: after the first turn the picture is
    no longer seen. Returns the new token ids (1-D).
    """
    user = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    assistant = "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>"
    text = "".join(user.format(q) + assistant.format(a) for q, a in history)
    text += user.format(question) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    input_ids = tokenizer(text, return_tensors="pt").input_ids.to(text_model.device)  # (1, L), BOS added
    kwargs = {**generation_defaults(tokenizer), **generate_kwargs}
    with torch.inference_mode():
        out = text_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out[0, input_ids.shape[1]:]


def load_alpha_projector_state(path):
    """Step 8 (loading), the original script's: read ``mm_projector.bin``
    (keys ``model.mm_projector.N.*``) and remove the substring ``mm_projector.``
    so the keys become ``model.N.*``. Unlike the original, ``weights_only=True``.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key.replace("mm_projector.", ""): value for key, value in state.items()}
