"""``process_tensors`` and ``splice_batch`` (step 5) against constructions written here.

The expected embeddings are built row by row from ``embedding.weight[id]`` and the image
feature rows, one position at a time -- no slicing logic shared with the package.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llama3vision_min import process_tensors, splice_batch

SENTINEL = -200
IGNORE = -100
VOCAB, HIDDEN = 50, 6


def make_embedding(seed=0, vocab=VOCAB, hidden=HIDDEN):
    torch.manual_seed(seed)
    return nn.Embedding(vocab, hidden)


def make_features(n_images, n_patches, hidden=HIDDEN, seed=1):
    generator = torch.Generator().manual_seed(seed)
    # Offset so no image row can be confused with an embedding row.
    return torch.randn(n_images, n_patches, hidden, generator=generator) + 100.0


def expected_row(ids, features, next_image, weight, labels=None):
    """One prompt, unpadded: a list of vectors (and labels), one position at a time."""
    vectors, row_labels = [], []
    for i, token in enumerate(ids):
        if token == SENTINEL:
            for patch in features[next_image]:
                vectors.append(patch)
                row_labels.append(IGNORE)
            next_image += 1
        else:
            vectors.append(weight[token])
            row_labels.append(None if labels is None else labels[i])
    return torch.stack(vectors), row_labels, next_image


def expected_batch(rows, features, weight, padding_side, labels=None):
    """Independent padded construction: (embeds rows, mask, real-position list, labels) per row."""
    built, next_image = [], 0
    for b, ids in enumerate(rows):
        vectors, row_labels, next_image = expected_row(ids, features, next_image, weight,
                                                       None if labels is None else labels[b])
        built.append((vectors, row_labels))
    longest = max(len(v) for v, _ in built)
    out = []
    for vectors, row_labels in built:
        pad = longest - len(vectors)
        start = pad if padding_side == "left" else 0
        mask = [0] * pad + [1] * len(vectors) if padding_side == "left" else [1] * len(vectors) + [0] * pad
        out.append({"embeds": vectors, "start": start, "n": len(vectors), "mask": mask, "labels": row_labels})
    return longest, out


def check_batch(result, rows, features, weight, padding_side, labels=None):
    longest, expected = expected_batch(rows, features, weight, padding_side, labels)
    batch = len(rows)
    assert result.inputs_embeds.shape == (batch, longest, weight.shape[1])
    assert result.attention_mask.shape == (batch, longest)
    assert result.attention_mask.dtype == torch.long
    assert result.position_ids.shape == (batch, longest)
    for b, exp in enumerate(expected):
        assert result.attention_mask[b].tolist() == exp["mask"]
        real = slice(exp["start"], exp["start"] + exp["n"])
        torch.testing.assert_close(result.inputs_embeds[b, real], exp["embeds"], rtol=0, atol=0)
        assert result.position_ids[b, real].tolist() == list(range(exp["n"]))
        if labels is not None:
            assert result.labels.shape == (batch, longest)
            got = result.labels[b].tolist()
            want = [IGNORE] * longest
            want[real] = exp["labels"]
            assert got == want
        else:
            assert result.labels is None


# -- process_tensors -----------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 1, 4, 7])
@pytest.mark.parametrize("n_patches", [1, 5])
def test_process_tensors_shapes_mask_and_rows(split, n_patches):
    emb = make_embedding()
    L = 8
    ids = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(split))
    ids[0, split] = SENTINEL
    features = make_features(1, n_patches)
    with torch.no_grad():
        embeds, mask = process_tensors(ids, features, emb)
    assert embeds.shape == (1, L - 1 + n_patches, HIDDEN)
    assert mask.shape == (1, L - 1 + n_patches)
    assert mask.dtype == torch.long and bool((mask == 1).all())
    weight = emb.weight.detach()
    before = ids[0, :split].tolist()
    after = ids[0, split + 1:].tolist()
    for i, token in enumerate(before):
        assert torch.equal(embeds[0, i], weight[token])
    assert torch.equal(embeds[0, split:split + n_patches], features[0])
    for j, token in enumerate(after):
        assert torch.equal(embeds[0, split + n_patches + j], weight[token])


def test_process_tensors_gradients_reach_the_features():
    emb = make_embedding()
    features = make_features(1, 4).requires_grad_(True)
    embeds, _ = process_tensors(torch.tensor([[1, SENTINEL, 2]]), features, emb)
    (embeds[0, 1:5] * torch.arange(1.0, 5.0)[:, None]).sum().backward()
    expected = torch.arange(1.0, 5.0)[:, None].expand(4, HIDDEN)
    torch.testing.assert_close(features.grad[0], expected)


# -- splice_batch --------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_splice_batch_equals_process_tensors_on_batch_of_one(padding_side):
    emb = make_embedding()
    ids = torch.tensor([[3, 7, 9, SENTINEL, 11, 12]])
    features = make_features(1, 5)
    with torch.no_grad():
        embeds, mask = process_tensors(ids, features, emb)
        result = splice_batch(ids, features, emb, padding_side=padding_side)
    assert torch.equal(result.inputs_embeds, embeds)
    assert torch.equal(result.attention_mask, mask)
    assert result.position_ids.tolist() == [list(range(ids.shape[1] - 1 + 5))]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_several_images_and_prompts_hand_built(padding_side):
    emb = make_embedding()
    weight = emb.weight.detach()
    P = 3
    rows = [
        [1, SENTINEL, 2, 3, SENTINEL],  # two images, one at the end
        [SENTINEL, SENTINEL],  # two adjacent images, no text
        [4, 5, 6, 7, 8, 9, SENTINEL, 10],  # one image
        [11, 12],  # no image
    ]
    features = make_features(5, P)
    with torch.no_grad():
        result = splice_batch([torch.tensor(r) for r in rows], features, emb, padding_side=padding_side)
    f = features
    hand = [
        torch.cat([weight[[1]], f[0], weight[[2, 3]], f[1]]),
        torch.cat([f[2], f[3]]),
        torch.cat([weight[[4, 5, 6, 7, 8, 9]], f[4], weight[[10]]]),
        weight[[11, 12]],
    ]
    longest = max(len(h) for h in hand)
    assert result.inputs_embeds.shape == (4, longest, HIDDEN)
    for b, h in enumerate(hand):
        mask = result.attention_mask[b]
        assert int(mask.sum()) == len(h)
        real = mask.bool()
        assert torch.equal(result.inputs_embeds[b, real], h)
        if padding_side == "left":
            assert mask[: longest - len(h)].sum() == 0 and bool(mask[longest - len(h):].all())
        else:
            assert bool(mask[: len(h)].all()) and mask[len(h):].sum() == 0
        assert result.position_ids[b, real].tolist() == list(range(len(h)))
    check_batch(result, rows, features, weight, padding_side)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_tensor_input_with_attention_mask(padding_side):
    """Input rows already padded (any side) are unpadded through their attention mask first."""
    emb = make_embedding()
    weight = emb.weight.detach()
    rows = [[1, 2, SENTINEL, 3], [SENTINEL, 4]]
    # Input padded on the left with a real id (0): only the mask says it is padding.
    input_ids = torch.tensor([[1, 2, SENTINEL, 3], [0, 0, SENTINEL, 4]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    labels = torch.tensor([[IGNORE, 2, IGNORE, 3], [IGNORE, IGNORE, IGNORE, 4]])
    features = make_features(2, 4)
    with torch.no_grad():
        result = splice_batch(input_ids, features, emb, attention_mask=attention_mask, labels=labels,
                              padding_side=padding_side)
    check_batch(result, rows, features, weight, padding_side,
                labels=[[IGNORE, 2, IGNORE, 3], [IGNORE, 4]])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_labels_ignore_image_rows_and_padding(padding_side):
    emb = make_embedding()
    P = 2
    # The sentinel slot carries a *real* label (42) and the padding junk (1): both must become -100.
    input_ids = torch.tensor([[5, SENTINEL, 6, 7], [8, SENTINEL, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    label_tensor = torch.tensor([[5, 42, 6, 7], [8, 42, 1, 1]])
    with torch.no_grad():
        result = splice_batch(input_ids, make_features(2, P), emb, attention_mask=mask, labels=label_tensor,
                              padding_side=padding_side)
    row0 = [5, IGNORE, IGNORE, 6, 7]
    row1 = [8, IGNORE, IGNORE]
    pad1 = [IGNORE, IGNORE]
    assert result.labels[0].tolist() == row0
    assert result.labels[1].tolist() == (pad1 + row1 if padding_side == "left" else row1 + pad1)
    assert 42 not in result.labels.flatten().tolist()


# -- property-based ------------------------------------------------------------------------------
@st.composite
def batches(draw):
    n_rows = draw(st.integers(1, 4))
    rows = []
    for _ in range(n_rows):
        length = draw(st.integers(1, 9))
        row = draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
        n_images = draw(st.integers(0, 3))
        for _ in range(n_images):
            row.insert(draw(st.integers(0, len(row))), SENTINEL)
        rows.append(row)
    n_patches = draw(st.integers(1, 4))
    padding_side = draw(st.sampled_from(["left", "right"]))
    input_form = draw(st.sampled_from(["list", "left-padded", "right-padded"]))
    with_labels = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return rows, n_patches, padding_side, input_form, with_labels, seed


@settings(max_examples=60, deadline=None)
@given(batches())
def test_property_splice_batch_matches_independent_construction(case):
    rows, n_patches, padding_side, input_form, with_labels, seed = case
    emb = make_embedding(seed=seed % 7)
    weight = emb.weight.detach()
    n_images = sum(r.count(SENTINEL) for r in rows)
    features = make_features(n_images, n_patches, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    row_labels = [[int(torch.randint(-1, VOCAB, (), generator=generator)) for _ in r] for r in rows]
    row_labels = [[IGNORE if v < 0 else v for v in r] for r in row_labels]

    kwargs = {"padding_side": padding_side}
    if input_form == "list":
        input_ids = [torch.tensor(r, dtype=torch.long) for r in rows]
        if with_labels:
            # A list of rows with labels goes through the padded form: labels need a tensor.
            input_form = "right-padded"
    if input_form != "list":
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), 0, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), 7, dtype=torch.long)  # junk under the padding
        for b, r in enumerate(rows):
            where = slice(width - len(r), width) if input_form == "left-padded" else slice(0, len(r))
            input_ids[b, where] = torch.tensor(r)
            mask[b, where] = 1
            labels[b, where] = torch.tensor(row_labels[b])
        kwargs["attention_mask"] = mask
        if with_labels:
            kwargs["labels"] = labels

    with torch.no_grad():
        result = splice_batch(input_ids, features, emb, **kwargs)
    check_batch(result, rows, features, weight, padding_side, labels=row_labels if with_labels else None)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 8), st.integers(0, 8), st.integers(1, 5), st.integers(0, 1000))
def test_property_process_tensors_matches_independent_construction(n_before, n_after, n_patches, seed):
    emb = make_embedding(seed=seed % 5)
    weight = emb.weight.detach()
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(0, VOCAB, (n_before,), generator=generator).tolist()
    after = torch.randint(0, VOCAB, (n_after,), generator=generator).tolist()
    ids = torch.tensor([before + [SENTINEL] + after])
    features = make_features(1, n_patches, seed=seed)
    with torch.no_grad():
        embeds, mask = process_tensors(ids, features, emb)
    want = torch.stack([weight[t] for t in before] + list(features[0]) + [weight[t] for t in after])
    assert embeds.shape == (1, len(want), HIDDEN)
    assert torch.equal(embeds[0], want)
    assert mask.dtype == torch.long and mask.tolist() == [[1] * len(want)]
    with torch.no_grad():
        batch = splice_batch(ids, features, emb)
    assert torch.equal(batch.inputs_embeds, embeds) and torch.equal(batch.attention_mask, mask)
