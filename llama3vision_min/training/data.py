"""LLaVA-Pretrain as training examples: the picture, the prompt with its -200, answer-only labels.

The data is LLaVA-Pretrain (558k LAION/CC/SBU pictures with BLIP captions): a JSON list of
``{"image": "00453/004539375.jpg", "conversations": [{"from": "human", "value": "<image>\\nRender a
clear and concise summary of the photo."}, {"from": "gpt", "value": "a caption"}]}`` and a folder
of pictures (https://huggingface.co/datasets/liuhaotian/LLaVA-Pretrain).

Sources: LLaVA's ``LazySupervisedDataset``, ``preprocess_plain`` and ``DataCollatorForSupervisedDataset``
in ``llava/train/train.py`` (https://github.com/haotian-liu/LLaVA/blob/main/llava/train/train.py). Unlike
LLaVA's stage 1, which trains on the bare caption after the picture, the prompt here is the model's own
chat prompt (``build_prompt``), the format the projector is used with.
"""

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

from ..constants import EOT_TOKEN, IGNORE_INDEX, IMAGE_PLACEHOLDER
from ..image import PICTURE_FORMATS
from ..prompt import chat_segments
from ..token_split import prompt_ids


def caption_example(conversation):
    """A LLaVA-Pretrain conversation -> ``(question, answer)``.

    The human turn holds the ``<image>`` placeholder and an instruction; our prompt format
    always puts the picture first (``build_prompt``), so the placeholder is removed here.
    """
    if not isinstance(conversation, list) or not all(isinstance(turn, dict) for turn in conversation):
        raise ValueError(f"expected 'conversations' to be a list of turns ({{'from': ..., 'value': ...}}), "
                         f"got {conversation!r:.80}")
    if len(conversation) != 2 or conversation[0].get("from") != "human" \
            or conversation[1].get("from") != "gpt":
        raise ValueError("expected a human turn then a gpt turn, "
                         f"got {[turn.get('from') for turn in conversation]}")
    if not all(isinstance(turn.get("value"), str) for turn in conversation):
        raise ValueError("expected each turn's 'value' to be text")
    question = conversation[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    return question, conversation[1]["value"].strip()


class LlavaPretrain(torch.utils.data.Dataset):
    """LLaVA-Pretrain's JSON and picture folder as a dataset of ``{"image", "question", "answer"}``.

    Every entry is checked when the dataset is made -- its fields, its conversation, a picture
    path inside the folder that names a picture file (its header read, in a format the command line
    opens) -- so a bad entry stops the run before training, not hours into it; the error names the
    file and the entry. A symbolic link must stay inside the folder, or inside the Hugging Face cache
    repository the folder is a snapshot of (``huggingface_hub`` stores each file as a link into the
    repository's ``blobs/``).
    """

    def __init__(self, json_path, image_folder, limit=None):
        json_path, self.image_folder = Path(json_path), Path(image_folder)
        Image.init()  # every format plugin registered, so that ``formats`` can name them
        parts = self.image_folder.resolve().parts
        self.inside = Path(*parts[: parts.index("snapshots")]) if "snapshots" in parts else Path(*parts)
        try:
            entries = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{json_path} is not a readable JSON file: {error}") from None
        if not isinstance(entries, list):
            raise ValueError(f"expected a JSON list of examples in {json_path}, got {type(entries).__name__}")
        entries = entries[:limit] if limit else entries
        if not entries:
            raise ValueError(f"{json_path} holds no examples")
        self.examples = []
        for index, entry in enumerate(entries):
            try:
                self.examples.append(self._check(entry))
            except ValueError as error:
                raise ValueError(f"{json_path}, example {index}: {error}") from None

    def _check(self, entry):
        """``(picture path, question, answer)`` of one entry, or a ValueError that says what is wrong."""
        if not isinstance(entry, dict) or "image" not in entry or "conversations" not in entry:
            raise ValueError(f"expected an object with 'image' and 'conversations', got {entry!r:.80}")
        question, answer = caption_example(entry["conversations"])
        name = entry["image"]
        path = self.image_folder / name if isinstance(name, str) else None
        if path is None or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"expected a picture path inside {self.image_folder}, got {name!r}")
        if not path.is_file():
            raise ValueError(f"picture {name!r} not found in {self.image_folder}")
        if not path.resolve().is_relative_to(self.inside):
            raise ValueError(f"picture {name!r} is a link to {path.resolve()}, outside {self.image_folder}")
        try:
            with Image.open(path, formats=PICTURE_FORMATS):
                pass  # the header is read: the file is a picture of a format we open
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"picture {name!r} cannot be read as a picture ({', '.join(PICTURE_FORMATS)}): "
                             f"{type(error).__name__}") from None
        return path, question, answer

    def __len__(self):
        return len(self.examples)

    def fingerprint(self):
        """A digest of the examples (picture names, questions, captions), so that a checkpoint is never
        resumed on other data."""
        text = json.dumps([(str(path.relative_to(self.image_folder)), question, answer)
                           for path, question, answer in self.examples])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __getitem__(self, index):
        path, question, answer = self.examples[index]
        with Image.open(path, formats=PICTURE_FORMATS) as image:
            image.load()
            return {"image": image.copy(), "question": question, "answer": answer}


class EpochOrder(torch.utils.data.Sampler):
    """The order examples are read in: each epoch a permutation drawn from ``seed + epoch``, cut to
    whole global batches.

    It depends on nothing else -- not the number of processes, not the global random state -- so one
    process and eight read the same global batches (accelerate deals them out, one per-device batch
    per process in turn), and a resumed run reads the rest of the epoch it stopped in. The last
    ``len(dataset) % global_batch`` examples of each epoch's order are left out (others next epoch):
    every update sees a full global batch, and no process ever repeats an example to fill one.
    """

    def __init__(self, size, global_batch, seed):
        self.size, self.seed, self.epoch = size, seed, 0
        self.used = size - size % global_batch
        if not self.used:
            raise ValueError(f"a global batch of {global_batch} needs at least that many examples, "
                             f"got {size}")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[: self.used].tolist())

    def __len__(self):
        return self.used


def example_ids(question, answer, tokenizer):
    """``(input_ids, labels)``, 1-D: the prompt with its ``-200`` sentinel, then the answer and
    ``<|eot_id|>``.

    Labels are ``IGNORE_INDEX`` on the prompt, so the loss is on the answer (and the end of
    turn, so the model learns to stop). The answer is tokenized apart from the prompt, the
    way generation sees it: the prompt ends with the assistant header, the answer follows.
    Question and caption are read as text, special-token strings included (``token_split.prompt_ids``).
    """
    prompt = prompt_ids(chat_segments([(question, None)]), tokenizer)  # (L_prompt,) with one -200
    answer_ids = prompt_ids([("text", answer), ("template", EOT_TOKEN)], tokenizer,
                            continuation=True)  # (L_answer,)
    input_ids = torch.cat([prompt, answer_ids])
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer_ids])
    return input_ids, labels


class Collator:
    """Examples -> one right-padded training batch for ``LlamaVision.forward``.

    Returns ``input_ids`` (batch, L) padded with the pad id, ``attention_mask`` (batch, L)
    with 0 on padding, ``labels`` (batch, L) with ``IGNORE_INDEX`` on prompt and padding,
    and ``pixel_values`` (batch, 3, H, W) from the model's image processor.
    """

    def __init__(self, tokenizer, preprocess, max_length=None):
        self.tokenizer = tokenizer
        self.preprocess = preprocess  # PIL images -> pixel values, e.g. LlamaVision.preprocess
        self.max_length = max_length  # text tokens per example (the picture adds its patches)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def __call__(self, examples):
        rows = [example_ids(e["question"], e["answer"], self.tokenizer) for e in examples]
        if self.max_length:
            rows = [(ids[: self.max_length], labels[: self.max_length]) for ids, labels in rows]
        longest = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for b, (ids, row_labels) in enumerate(rows):
            input_ids[b, : len(ids)] = ids
            labels[b, : len(ids)] = row_labels
            attention_mask[b, : len(ids)] = 1
        pixel_values = self.preprocess([e["image"] for e in examples])  # (batch, 3, H, W)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values}
