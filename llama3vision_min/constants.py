"""Constants shared by every step of the pipeline.

The original model marks "the picture goes here" with a sentinel token id of -200.
-200 is not a real vocabulary id: it never reaches the embedding layer, it is only a
marker that the splice (``splice.py``) replaces with the projected image features.
"""

IMAGE_TOKEN_INDEX = -200
"""Sentinel id that stands for the image inside ``input_ids``."""

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
