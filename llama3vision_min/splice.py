"""Step 5 of the pipeline: splice the projected image features into the token embeddings.

This is the whole trick of llama-3-vision-alpha. The LLM never sees an "image token":
the ids before the ``-200`` sentinel and the ids after it are embedded with the LLM's
own embedding layer, and the image's projected patch vectors are put in between::

    input_ids:  [ before ... | -200 | after ... ]            (1, L)
    embeds:     [ before ... | 729 image rows | after ... ]   (1, L - 1 + 729, 4096)
    mask:       all ones                                     (1, L - 1 + 729)

``process_tensors`` is that splice exactly as the original does it (one prompt, one
image). ``splice_batch`` is the generalisation the model uses: several images per
prompt, several prompts per batch, padding, position ids and training labels.

Sources:

* ``process_tensors`` in the official ``modeling_llamavision.py``
  (https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py);
  transcribed literally in ``llama3vision_original.py`` at the top of this repository
* LLaVA's ``prepare_inputs_labels_for_multimodal`` in ``llava/model/llava_arch.py``
  (https://github.com/haotian-liu/LLaVA/blob/main/llava/model/llava_arch.py): the same splice for
  batches, with labels and padding, which ``splice_batch`` follows
* transformers' ``LlavaForConditionalGeneration`` (``models/llava/modeling_llava.py``) does it the other
  way round: one real token id repeated once per patch, its rows overwritten (see ``tools/llava_export.py``)
"""

from dataclasses import dataclass

import torch

from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def process_tensors(input_ids, image_features, embedding_layer):
    """The original splice: ``(embeds, attention_mask)`` for one prompt and one image.

    input_ids:      (1, L) with exactly one ``-200``
    image_features: (1, n_patches, hidden) -- already projected
    returns:        embeds (1, L - 1 + n_patches, hidden), mask (1, L - 1 + n_patches) of ones (long)
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"process_tensors expects input_ids of shape (1, seq_len), got "
                         f"{tuple(getattr(input_ids, 'shape', ()))}; use splice_batch for batches")
    check_ids(input_ids, embedding_layer.weight.shape[0])
    sentinels = (input_ids[0] == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[0]
    if len(sentinels) == 0:
        raise ValueError(f"input_ids contain no image sentinel ({IMAGE_TOKEN_INDEX}); "
                         "tokenize a prompt that has '<image>' with tokenizer_image_token")
    if len(sentinels) > 1:
        raise ValueError(f"process_tensors takes one image but input_ids contain {len(sentinels)} "
                         "sentinels; use splice_batch")
    split = int(sentinels[0])

    input_ids = input_ids.to(embedding_layer.weight.device)  # the ids go where the embedding lives (a GPU)
    before = embedding_layer(input_ids[:, :split])  # (1, split, hidden)
    after = embedding_layer(input_ids[:, split + 1 :])  # (1, L - split - 1, hidden)
    device = image_features.device
    embeds = torch.cat([before.to(device), image_features, after.to(device)], dim=1)  # (1, L - 1 + P, hidden)
    attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)  # (1, L - 1 + P)
    return embeds, attention_mask


def check_ids(ids, n_embeddings, image_token_index=IMAGE_TOKEN_INDEX):
    """Refuse ids that are not integers, or that name no row of the embedding matrix (but the sentinel)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got a tensor of {ids.dtype}")
    text = ids[ids != image_token_index]
    outside = text[(text < 0) | (text >= n_embeddings)]
    if outside.numel():
        raise ValueError(f"input_ids hold {outside[0].item()}, which is neither a token id of this LLM "
                         f"(0 .. {n_embeddings - 1}) nor the image sentinel ({image_token_index})")


@dataclass
class SplicedBatch:
    """What ``splice_batch`` returns: everything the LLM's forward needs."""

    inputs_embeds: torch.Tensor  # (batch, T, hidden)
    attention_mask: torch.Tensor  # (batch, T), 1 = real, 0 = padding
    position_ids: torch.Tensor  # (batch, T), 0, 1, 2, ... over the real positions
    labels: torch.Tensor | None = None  # (batch, T), IGNORE_INDEX on image rows and padding


def _rows(input_ids, attention_mask, labels):
    """Yield each prompt's real ids (and labels) with the padding removed."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        for name, other in (("attention_mask", attention_mask), ("labels", labels)):
            if other is not None and tuple(other.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(other.shape)}")
    elif not isinstance(input_ids, (list, tuple)) or not all(
            isinstance(ids, torch.Tensor) and ids.dim() == 1 for ids in input_ids):
        raise ValueError("input_ids must be a tensor or a list of 1-D id tensors")
    elif attention_mask is not None or labels is not None:
        raise ValueError("a list of unpadded id tensors takes no attention_mask or labels: "
                         "pad them into a tensor")
    if len(input_ids) == 0:
        raise ValueError("input_ids hold no prompt (an empty batch)")
    for b, ids in enumerate(input_ids):
        keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        row_labels = None if labels is None else labels[b][keep]
        yield ids[keep], row_labels


def splice_batch(
    input_ids,
    image_features,
    embedding_layer,
    attention_mask=None,
    labels=None,
    padding_side="left",
    image_token_index=IMAGE_TOKEN_INDEX,
):
    """Splice any number of images into any number of prompts, and pad the result.

    input_ids:      (batch, L) padded ids with an ``attention_mask``, or a list of 1-D id tensors
    image_features: (n_images, n_patches, hidden) projected features, consumed in reading
                    order: the sentinels of row 0 from left to right, then row 1, ...
    labels:         optional (batch, L) training labels aligned with ``input_ids``
    padding_side:   "left" for generation (new tokens follow the real ones), "right" for training

    On a batch of one prompt with one image the embeddings and mask equal ``process_tensors``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = list(_rows(input_ids, attention_mask, labels))
    weight = embedding_layer.weight
    for ids, _ in rows:
        check_ids(ids, weight.shape[0], image_token_index)
    if image_features.dim() != 3 or image_features.shape[-1] != weight.shape[1]:
        raise ValueError(f"image_features must be (n_images, n_patches, {weight.shape[1]}) -- projected to "
                         f"the LLM's width -- got shape {tuple(image_features.shape)}")
    n_sentinels = sum(int((ids == image_token_index).sum()) for ids, _ in rows)
    if n_sentinels != len(image_features):
        raise ValueError(f"the prompts hold {n_sentinels} image sentinels ({image_token_index}) "
                         f"but {len(image_features)} image feature blocks were given")

    image_features = image_features.to(device=weight.device, dtype=weight.dtype)
    next_image = 0
    spliced = []  # one (embeds, labels) pair per prompt, unpadded
    for ids, row_labels in rows:
        ids = ids.to(weight.device)
        is_image = ids == image_token_index
        # Embed every text id in one call; the sentinel rows are placeholders that are cut out below.
        text_embeds = embedding_layer(ids.masked_fill(is_image, 0))  # (L_row, hidden)
        embed_pieces, label_pieces, start = [], [], 0
        for pos in is_image.nonzero(as_tuple=True)[0].tolist():
            image = image_features[next_image]  # (n_patches, hidden)
            next_image += 1
            embed_pieces += [text_embeds[start:pos], image]
            if row_labels is not None:
                ignore = row_labels.new_full((len(image),), IGNORE_INDEX)
                label_pieces += [row_labels[start:pos], ignore]
            start = pos + 1
        embed_pieces.append(text_embeds[start:])
        if row_labels is not None:
            label_pieces.append(row_labels[start:])
        spliced.append((torch.cat(embed_pieces), torch.cat(label_pieces) if row_labels is not None else None))
    return _pad(spliced, padding_side, with_labels=labels is not None)


def _pad(spliced, padding_side, with_labels):
    """Pad unpadded (embeds, labels) rows to one length; build mask and position ids."""
    batch, longest = len(spliced), max(len(embeds) for embeds, _ in spliced)
    hidden = spliced[0][0].shape[-1]
    like = spliced[0][0]
    inputs_embeds = like.new_zeros(batch, longest, hidden)  # (batch, T, hidden)
    attention_mask = torch.zeros(batch, longest, dtype=torch.long, device=like.device)  # (batch, T)
    out_labels = torch.full((batch, longest), IGNORE_INDEX, device=like.device) if with_labels else None
    for b, (embeds, row_labels) in enumerate(spliced):
        n = len(embeds)
        where = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        inputs_embeds[b, where] = embeds
        attention_mask[b, where] = 1
        if with_labels:
            out_labels[b, where] = row_labels.to(like.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, T)
    return SplicedBatch(inputs_embeds, attention_mask, position_ids, out_labels)
