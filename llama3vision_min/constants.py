"""The few numbers and strings every step of the pipeline shares, each named once.

``-200`` and ``-100`` are LLaVA's conventions, which llama-3-vision-alpha kept
(LLaVA's ``llava/constants.py``: https://github.com/haotian-liu/LLaVA/blob/main/llava/constants.py).
"""

IMAGE_TOKEN_INDEX = -200
"""Sentinel id that stands for the picture inside ``input_ids``.

Not a vocabulary id: it never reaches the embedding layer. The splice (``splice.py``)
replaces it with the projected image features."""

IMAGE_PLACEHOLDER = "<image>"
"""Text placeholder in the prompt that becomes ``IMAGE_TOKEN_INDEX`` after tokenization."""

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy ignores (image, prompt and padding positions)."""

EOT_TOKEN = "<|eot_id|>"
"""Llama 3 ends every chat turn with this token; generation must stop on it."""

DEFAULT_TEMPERATURE = 0.2
"""The original scripts sample at temperature 0.2."""

DEFAULT_MAX_NEW_TOKENS = 2000
"""The original answer_question allows up to 2000 new tokens (it stops on <|eot_id|> long before)."""
