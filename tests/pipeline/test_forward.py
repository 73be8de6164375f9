"""``LlamaVision.forward``: logits, loss, gradients and batching, checked against computations
written here (own label expansion, own cross-entropy, own splice through ``text_model``)."""

import copy

import pytest
import torch

from conftest import make_image

SENTINEL = -200
IGNORE = -100


def n_patches(model):
    config = model.vision_model.config
    return (config.image_size // config.patch_size) ** 2


def text_ids(tok, text):
    """Ids of ``text`` without BOS."""
    return tok(text, add_special_tokens=False).input_ids


def prompt_ids(tok, question, n_images=1):
    """BOS + user header + ``n_images`` sentinels + question + assistant header (built by hand)."""
    head = [tok.bos_token_id] + text_ids(tok, "<|start_header_id|>user<|end_header_id|>\n\n")
    tail = text_ids(tok, question + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    return head + [SENTINEL] * n_images + tail


def pixels(model, n, seed=0):
    return model.preprocess([make_image("RGB", (31 + i, 19 + 2 * i), seed=seed + i) for i in range(n)])


def own_features(model, pixel_values):
    with torch.no_grad():
        hidden = model.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2]
        return model.mm_projector(hidden)


def own_embeds(model, ids, features):
    """Splice by hand, one position at a time."""
    weight = model.text_model.get_input_embeddings().weight.detach()
    rows, k = [], 0
    for token in ids:
        if token == SENTINEL:
            rows.extend(features[k])
            k += 1
        else:
            rows.append(weight[token])
    return torch.stack(rows)[None]


def expand_labels(ids, labels, n_p):
    out = []
    for token, label in zip(ids, labels):
        out.extend([IGNORE] * n_p if token == SENTINEL else [label])
    return out


def own_loss(logits, expanded_labels):
    """Mean cross-entropy of next-token prediction over targets that are not -100."""
    labels = (torch.tensor(expanded_labels) if not isinstance(expanded_labels, torch.Tensor)
              else expanded_labels)
    labels = labels.reshape(logits.shape[0], -1)
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE
    log_probs = torch.log_softmax(pred[keep], dim=-1)
    return -log_probs[torch.arange(int(keep.sum())), target[keep]].mean()


def training_example(tok, question="what is this?", answer="a red circle.", n_images=1):
    ids = prompt_ids(tok, question, n_images) + text_ids(tok, answer + "<|eot_id|>")
    n_prompt = len(ids) - len(text_ids(tok, answer + "<|eot_id|>"))
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return ids, labels


# -- logits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_logits_length_counts_every_patch(both_sizes, n_images):
    model, tok = both_sizes
    ids = prompt_ids(tok, "what is this?", n_images)
    with torch.no_grad():
        out = model(torch.tensor([ids]), pixel_values=pixels(model, n_images))
    L = len(ids)
    P = n_patches(model)
    assert out.logits.shape == (1, L - n_images + n_images * P, model.text_model.config.vocab_size)


def test_logits_equal_text_model_on_hand_spliced_embeddings(both_sizes):
    model, tok = both_sizes
    ids = prompt_ids(tok, "how many shapes are there?", 2)
    pv = pixels(model, 2, seed=3)
    with torch.no_grad():
        got = model(torch.tensor([ids]), pixel_values=pv).logits
        want = model.text_model(inputs_embeds=own_embeds(model, ids, own_features(model, pv))).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_images_are_consumed_in_sentinel_order(tiny):
    model, tok = tiny
    ids = prompt_ids(tok, "what is this?", 2)
    pv = pixels(model, 2, seed=5)
    with torch.no_grad():
        forward = model(torch.tensor([ids]), pixel_values=pv).logits
        swapped = model(torch.tensor([ids]), pixel_values=pv.flip(0)).logits
    assert not torch.allclose(forward, swapped, atol=1e-4)


# -- loss -----------------------------------------------------------------------------------------
def test_loss_is_mean_cross_entropy_over_unignored_shifted_labels(both_sizes):
    model, tok = both_sizes
    ids, labels = training_example(tok)
    with torch.no_grad():
        out = model(torch.tensor([ids]), pixel_values=pixels(model, 1), labels=torch.tensor([labels]))
    expanded = expand_labels(ids, labels, n_patches(model))
    assert len(expanded) == out.logits.shape[1]
    want = own_loss(out.logits, expanded)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    # And it is not the loss over every position: masking the prompt matters.
    everything = own_loss(out.logits, expand_labels(ids, ids, n_patches(model)))
    assert not torch.isclose(out.loss, everything, atol=1e-3)


def test_loss_with_labels_on_prompt_too_matches_manual(tiny):
    """Prompt labels that are *not* -100 are honoured (only image rows are forced to -100)."""
    model, tok = tiny
    ids, _ = training_example(tok)
    labels = [IGNORE if t == SENTINEL else t for t in ids]
    with torch.no_grad():
        out = model(torch.tensor([ids]), pixel_values=pixels(model, 1), labels=torch.tensor([labels]))
    torch.testing.assert_close(out.loss, own_loss(out.logits, expand_labels(ids, labels, n_patches(model))),
                               rtol=1e-5, atol=1e-6)


def test_label_on_the_sentinel_slot_is_ignored(tiny):
    """Whatever the caller writes at the sentinel's label slot, every image row is -100."""
    model, tok = tiny
    ids, labels = training_example(tok)
    pv = pixels(model, 1)
    real = list(labels)
    real[ids.index(SENTINEL)] = 7  # a real id where the image goes
    with torch.no_grad():
        base = model(torch.tensor([ids]), pixel_values=pv, labels=torch.tensor([labels])).loss
        changed = model(torch.tensor([ids]), pixel_values=pv, labels=torch.tensor([real])).loss
    torch.testing.assert_close(base, changed, rtol=0, atol=0)


def test_loss_unaffected_by_logits_at_the_last_position(tiny):
    """Changing the last input token changes only the last position's logits, which predict
    nothing after the shift: the loss must not move, while the logits there do."""
    model, tok = tiny
    ids, labels = training_example(tok)
    other = list(ids)
    other[-1] = (ids[-1] + 1) % 300
    pv = pixels(model, 1)
    with torch.no_grad():
        a = model(torch.tensor([ids]), pixel_values=pv, labels=torch.tensor([labels]))
        b = model(torch.tensor([other]), pixel_values=pv, labels=torch.tensor([labels]))
    assert not torch.allclose(a.logits[0, -1], b.logits[0, -1], atol=1e-4)
    torch.testing.assert_close(a.logits[0, :-1], b.logits[0, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)


def test_loss_depends_on_answer_labels(tiny):
    model, tok = tiny
    ids, labels = training_example(tok)
    wrong = [label if label == IGNORE else (label + 1) % 300 for label in labels]
    pv = pixels(model, 1)
    with torch.no_grad():
        a = model(torch.tensor([ids]), pixel_values=pv, labels=torch.tensor([labels])).loss
        b = model(torch.tensor([ids]), pixel_values=pv, labels=torch.tensor([wrong])).loss
    assert not torch.isclose(a, b, atol=1e-4)


# -- gradients ------------------------------------------------------------------------------------
def test_only_the_projector_gets_gradients_when_towers_are_frozen(tiny):
    model, tok = tiny
    model = copy.deepcopy(model).train()
    model.vision_model.requires_grad_(False)
    model.text_model.requires_grad_(False)
    ids, labels = training_example(tok)
    out = model(torch.tensor([ids]), pixel_values=pixels(model, 1), labels=torch.tensor([labels]))
    out.loss.backward()
    projector = list(model.mm_projector.named_parameters())
    assert len(projector) == 4
    for name, param in projector:
        assert param.requires_grad
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    for name, param in (list(model.vision_model.named_parameters())
                        + list(model.text_model.named_parameters())):
        assert param.grad is None, name


def test_projector_gradient_matches_finite_difference(tiny):
    """The projector's gradient is the real one: the directional derivative along it (a central
    difference) equals its norm."""
    model, tok = tiny
    model = copy.deepcopy(model)
    model.vision_model.requires_grad_(False)
    model.text_model.requires_grad_(False)
    ids, labels = training_example(tok)
    pv = pixels(model, 1)
    feats = model.vision_model(pv, output_hidden_states=True).hidden_states[-2].detach()
    out = model(torch.tensor([ids]), vision_features=feats, labels=torch.tensor([labels]))
    out.loss.backward()
    bias = model.mm_projector.model[2].bias
    direction = bias.grad / bias.grad.norm()
    eps = 1e-3
    with torch.no_grad():
        bias += eps * direction
        up = model(torch.tensor([ids]), vision_features=feats, labels=torch.tensor([labels])).loss
        bias -= 2 * eps * direction
        down = model(torch.tensor([ids]), vision_features=feats, labels=torch.tensor([labels])).loss
    numeric = (up - down) / (2 * eps)
    torch.testing.assert_close(numeric, bias.grad.norm(), rtol=2e-2, atol=1e-4)


# -- paths and batching ---------------------------------------------------------------------------
def test_vision_features_path_equals_pixel_values_path(both_sizes):
    model, tok = both_sizes
    ids, labels = training_example(tok, n_images=2)
    pv = pixels(model, 2, seed=9)
    with torch.no_grad():
        feats = model.vision_model(pv, output_hidden_states=True).hidden_states[-2]
        a = model(torch.tensor([ids]), pixel_values=pv, labels=torch.tensor([labels]))
        b = model(torch.tensor([ids]), vision_features=feats, labels=torch.tensor([labels]))
        # The last layer's output is *not* what the model uses.
        c = model(torch.tensor([ids]),
                  vision_features=model.vision_model(pv, output_hidden_states=True).hidden_states[-1])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss)
    assert not torch.allclose(a.logits, c.logits, atol=1e-3)


def test_right_padded_batch_matches_each_row_alone(both_sizes):
    model, tok = both_sizes
    long_ids, long_labels = training_example(tok, "Please describe this image in detail.",
                                             "the picture shows a cat.")
    short_ids, short_labels = training_example(tok, "what?", "red.", n_images=2)
    assert len(long_ids) != len(short_ids)
    width = max(len(long_ids), len(short_ids))
    pad = tok.eos_token_id

    def padded(row, value):
        return row + [value] * (width - len(row))

    input_ids = torch.tensor([padded(long_ids, pad), padded(short_ids, pad)])
    attention_mask = torch.tensor([padded([1] * len(long_ids), 0), padded([1] * len(short_ids), 0)])
    labels = torch.tensor([padded(long_labels, IGNORE), padded(short_labels, IGNORE)])
    pv_long, pv_short = pixels(model, 1, seed=1), pixels(model, 2, seed=2)
    with torch.no_grad():
        batch = model(input_ids, pixel_values=torch.cat([pv_long, pv_short]), attention_mask=attention_mask,
                      labels=labels)
        alone_long = model(torch.tensor([long_ids]), pixel_values=pv_long).logits[0]
        alone_short = model(torch.tensor([short_ids]), pixel_values=pv_short).logits[0]
    P = n_patches(model)
    assert batch.logits.shape[1] == max(len(long_ids) - 1 + P, len(short_ids) - 2 + 2 * P)
    torch.testing.assert_close(batch.logits[0, : len(alone_long)], alone_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.logits[1, : len(alone_short)], alone_short, rtol=1e-5, atol=1e-5)
    # The batch loss is the mean over every unignored target of both rows (right padding: rows start at 0).
    T = batch.logits.shape[1]
    expanded = torch.full((2, T), IGNORE)
    for b, (ids, lab) in enumerate([(long_ids, long_labels), (short_ids, short_labels)]):
        row = expand_labels(ids, lab, P)
        expanded[b, : len(row)] = torch.tensor(row)
    torch.testing.assert_close(batch.loss, own_loss(batch.logits, expanded), rtol=1e-5, atol=1e-6)


def test_left_padded_batch_matches_each_row_alone(tiny):
    """``padding_side="left"``: each row's real positions sit at the right end, masked padding before
    them, and their logits equal the row run alone."""
    model, tok = tiny
    long_ids = prompt_ids(tok, "Please describe this image in detail.")
    short_ids = prompt_ids(tok, "what?")
    width = len(long_ids)
    input_ids = torch.tensor([long_ids, short_ids + [0] * (width - len(short_ids))])
    attention_mask = torch.tensor([[1] * width, [1] * len(short_ids) + [0] * (width - len(short_ids))])
    pv = pixels(model, 2, seed=4)
    with torch.no_grad():
        batch = model(input_ids, pixel_values=pv, attention_mask=attention_mask, padding_side="left").logits
        alone_long = model(torch.tensor([long_ids]), pixel_values=pv[:1]).logits[0]
        alone_short = model(torch.tensor([short_ids]), pixel_values=pv[1:]).logits[0]
    T = batch.shape[1]
    assert T == len(alone_long)
    torch.testing.assert_close(batch[0], alone_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1, T - len(alone_short):], alone_short, rtol=1e-5, atol=1e-5)


