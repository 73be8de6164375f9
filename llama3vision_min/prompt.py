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

USER = "<|start_header_id|>user<|end_header_id|>"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>"

USER_HEADER = USER + "\n\n"
"""What every user turn starts with."""

ASSISTANT_HEADER = ASSISTANT + "\n\n"
"""What the prompt ends with: the model continues from here."""


def build_prompt(question: str) -> str:
    """The single-turn prompt of the original model: image first, then the question."""
    return build_chat_prompt([(question, None)])


def build_chat_prompt(turns: list[tuple[str, str | None]]) -> str:
    """A multi-turn prompt that keeps the image in the first user turn.

    ``turns`` is ``[(question, answer), ..., (last_question, None)]``. Unlike the
    original chat script, which re-tokenised the history *without* the image, the
    ``<image>`` placeholder stays in the first turn so every answer can see it.
    """
    return "".join(text for _, text in chat_segments(turns))


def chat_segments(turns):
    """The prompt of ``turns`` in pieces that say who wrote them: ``[(kind, text), ...]``.

    ``"template"``: the chat format's own special tokens; ``"image"``: the ``<image>`` placeholder;
    ``"text"``: what a person or the model wrote, to be read as plain text even when it looks like
    a special token (a question holding ``<|eot_id|><|start_header_id|>assistant...`` must not end
    its own turn). The two newlines after a header travel with the text that follows them, so every
    text piece lies between two special tokens, which a tokenizer never merges across: the pieces
    give the same ids as the joined prompt (``token_split.prompt_ids``).
    """
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"turns must be a non-empty list of (question, answer) pairs, got {turns!r}")
    segments = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise ValueError(f"each turn must be a (question, answer) pair, got {turn!r}")
        question, answer = turn
        answered = i < len(turns) - 1  # every turn but the last has its answer
        if not isinstance(question, str) or not (isinstance(answer, str) if answered else answer is None):
            raise ValueError("turns must be (question, answer) pairs of strings, the last with answer None; "
                             f"got turn {i} = {turn!r}")
        if i == 0:
            segments += [("template", USER), ("text", "\n\n"), ("image", IMAGE_PLACEHOLDER),
                         ("text", question)]
        else:
            segments += [("template", USER), ("text", "\n\n" + question)]
        segments.append(("template", EOT_TOKEN))
        if answered:
            segments += [("template", ASSISTANT), ("text", "\n\n" + answer), ("template", EOT_TOKEN)]
    return segments + [("template", ASSISTANT), ("text", "\n\n")]


def follow_up_segments(question):
    """The segments of a later user turn and the assistant header after it (a chat's next question)."""
    if not isinstance(question, str):
        raise ValueError(f"the question must be a str, got {type(question).__name__}")
    return [("template", USER), ("text", "\n\n" + question), ("template", EOT_TOKEN),
            ("template", ASSISTANT), ("text", "\n\n")]
