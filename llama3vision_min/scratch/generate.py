"""Generation written out for the from-scratch Llama: prefill the spliced prompt once, then a token at a time.

    prefill   inputs_embeds (batch, T, width) -> every layer's keys and values cached -> scores at T-1
    decode    the chosen token (batch, 1) -> its keys and values cached at T, T+1, ... -> scores

Each step picks the next token as transformers' ``generate`` does for greedy and sampled decoding
(``GenerationMixin._sample``, https://github.com/huggingface/transformers/blob/main/src/transformers/generation/
utils.py): the stop tokens barred until ``min_new_tokens``, then temperature, top-k and top-p in that order,
then ``argmax`` or one ``torch.multinomial`` draw -- so the same weights and seed give the same ids. What it
leaves out is what makes ``generate`` general: its logits-processor objects, stopping criteria, a cache object
that grows by concatenation, and the inputs rebuilt at every step. Here the cache is allocated ahead and
written in place, the mask and the rotary angles are computed once for every position, and a decode step runs
only the layers
(as nanoGPT's ``generate``, https://github.com/karpathy/nanoGPT/blob/master/model.py, and nanoVLM's
prefill-then-decode, https://github.com/huggingface/nanoVLM/blob/main/models/language_model.py).
"""

import torch


class KVCache:
    """Every layer's keys and values, in tensors allocated ahead: (batch, kv_heads, capacity, head_dim).

    ``length`` positions are filled; ``update`` writes the next ones and returns the filled part, as
    transformers' ``DynamicCache.update`` returns its concatenation (the attention sees the same tensors).
    Past ``capacity`` (a long answer, a chat's next turn) the tensors are reallocated, twice as long."""

    def __init__(self, config, batch, capacity, dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = 0

    def get_seq_length(self, layer_index=0):
        return self.length

    def _grow(self, end):
        """Room for ``end`` positions or twice the present ones, whichever is more (the filled part kept)."""
        more = max(end, 2 * self.keys[0].shape[2]) - self.keys[0].shape[2]
        self.keys = [torch.cat([t, t.new_zeros(*t.shape[:2], more, t.shape[3])], 2) for t in self.keys]
        self.values = [torch.cat([t, t.new_zeros(*t.shape[:2], more, t.shape[3])], 2) for t in self.values]

    def update(self, k, v, layer_index):
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys[layer_index].shape[2]:  # a doubling: a few times per answer at most
            self._grow(end)
        self.keys[layer_index][:, :, start:end] = k  # (b, 8, new, 128), written in place
        self.values[layer_index][:, :, start:end] = v
        if layer_index == len(self.keys) - 1:  # the last layer: these positions are now cached everywhere
            self.length = end
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]


def choose(logits, new_so_far, stops, min_new_tokens, do_sample, temperature, top_k, top_p):
    """(batch, vocab) float32 scores -> (batch,) next ids, as ``generate``'s processors and draw pick them."""
    if new_so_far < min_new_tokens:
        logits = logits.index_fill(-1, stops, float("-inf"))  # too early to stop
    if not do_sample:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:  # keep the k best (and any tied with the k-th)
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of best tokens whose probability reaches top_p
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # the best token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)


@torch.inference_mode()
def generate(lm, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, cache=None,
             min_new_tokens=0, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, streamer=None,
             prompt_ids=None):
    """New token ids (batch, n_new) after ``inputs_embeds`` (batch, T, width), the prompt's uncached part.

    ``attention_mask`` (batch, past + T): 0 on left padding. ``cache``: a ``KVCache`` holding the ``past``
    positions (a chat's earlier turns), or None for a new one. A row that meets a stop id is padded with
    ``pad_token_id`` from then on; the loop ends when every row has stopped or after ``max_new_tokens``.
    As in ``generate``, the last token chosen is never run through the model (the cache holds all but it).
    ``streamer`` receives ``prompt_ids`` (default: none), then each step's ids, then ``end()``.
    """
    decoder, batch, length = lm.model, inputs_embeds.shape[0], inputs_embeds.shape[1]
    device = inputs_embeds.device
    stops = torch.tensor(eos_token_id, device=device).reshape(-1)  # (n_stops,)
    if cache is None:  # room for the prompt and 128 new tokens, doubled if an answer runs longer: room for
        # the default limit of 2000 would take 360 MB per picture at Llama-3-8B's size in float16
        cache = KVCache(lm.config, batch, length + min(max_new_tokens, 128), inputs_embeds.dtype, device)
    past, total = cache.length, cache.length + length + max_new_tokens
    mask = torch.ones(batch, total, dtype=torch.long, device=device)  # grows by one position per step
    mask[:, : past + length] = attention_mask
    # Positions count the tokens that are not padding (generate's rule for left-padded batches): (b, total)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    angles = positions[..., None].float() * decoder.inv_freq.float()  # (b, total, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (b, 1, total, head_dim), as Decoder computes it
    cos, sin = angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype)
    seen = mask.bool()[:, None, None, :]  # (b, 1, 1, total): what a decoding position may attend to
    new = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    running = torch.ones(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(prompt_ids if prompt_ids is not None else torch.empty((batch, 0), dtype=torch.long))

    # prefill: the whole uncached prompt in one pass, exactly as the model's forward runs it
    hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=mask[:, : past + length],
                     position_ids=positions[:, past: past + length], cache=cache).last_hidden_state
    for step in range(max_new_tokens):
        logits = lm.lm_head(hidden[:, -1:])[:, -1].float()  # (b, vocab): the last position's scores
        token = choose(logits, step, stops, min_new_tokens, do_sample, temperature, top_k, top_p)
        token = token.masked_fill(~running, pad_token_id)  # (b,)
        new[:, step] = token
        if streamer is not None:
            streamer.put(token.cpu())
        running &= ~torch.isin(token, stops)
        if step + 1 == max_new_tokens or not running.any():
            break
        # decode: one position, at p = past + length + step; the mask and angles are read, not rebuilt
        p = past + length + step
        at = (cos[:, :, p: p + 1], sin[:, :, p: p + 1], seen[..., : p + 1])  # (b, 1, 1, head_dim) x 2, mask
        x = decoder.embed_tokens(token[:, None])  # (b, 1, width)
        for layer in decoder.layers:
            x, _ = layer(x, *at, cache)
        hidden = decoder.norm(x)
    if streamer is not None:
        streamer.end()
    return new[:, : step + 1], cache
