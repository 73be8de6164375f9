"""Step 1 of the pipeline: the Llama 3 chat prompt, with the image placed first in the user turn.

The original model was trained on prompts of exactly this shape::

    <|start_header_id|>user<|end_header_id|>\\n\\n<image>{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line in reality). The ``<|begin_of_text|>`` token is *not* written here: the
tokenizer's post-processor adds it when the first chunk is tokenized.

Sources:

* the official model builds this prompt inside ``answer_question`` in ``modeling_llamavision.py``
  (https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py);
* the Llama 3 chat format: https://www.llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/
  (the Llama 3 paper, arXiv 2407.21783).
"""

from .constants import EOT_TOKEN, IMAGE_PLACEHOLDER

USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
"""What every user turn starts with."""

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
"""What the prompt ends with: the model continues from here."""


def user_turn(text: str) -> str:
    """One user turn in the Llama 3 chat format."""
    return USER_HEADER + text + EOT_TOKEN


def assistant_turn(text: str) -> str:
    """One finished assistant turn (used for chat history and for training targets)."""
    return ASSISTANT_HEADER + text + EOT_TOKEN


def build_prompt(question: str) -> str:
    """The single-turn prompt of the original model: image first, then the question."""
    return user_turn(IMAGE_PLACEHOLDER + question) + ASSISTANT_HEADER


def build_chat_prompt(turns: list[tuple[str, str | None]]) -> str:
    """A multi-turn prompt that keeps the image in the first user turn.

    ``turns`` is ``[(question, answer), ..., (last_question, None)]``. Unlike the
    original chat script, which re-tokenised the history *without* the image, the
    ``<image>`` placeholder stays in the first turn so every answer can see it.
    """
    if not turns or turns[-1][1] is not None:
        raise ValueError("turns must end with a question whose answer is None")
    parts = []
    for i, (question, answer) in enumerate(turns):
        text = IMAGE_PLACEHOLDER + question if i == 0 else question
        parts.append(user_turn(text))
        if answer is not None:
            parts.append(assistant_turn(answer))
    return "".join(parts) + ASSISTANT_HEADER
