"""Both towers written out in plain PyTorch, running the official weights: ``implementation="scratch"``.

* ``siglip.py``  -- SigLIP's vision encoder: patch embedding, position embedding, pre-norm encoder layers,
  every layer's hidden state (``hidden_states[-2]`` is what the model reads)
* ``llama.py``   -- Llama 3's decoder: RMSNorm, rotary positions (Llama 3.1's scaling too), grouped-query
  attention with a KV cache, SwiGLU, the output head
* ``weights.py`` -- the same weights into them: from a checkpoint, or around transformers' loaded modules
* ``generate.py`` -- the decoding loop: prefill once, then a token at a time into a cache allocated ahead

``LlamaVision.from_pretrained(path, implementation="scratch")``, ``LlamaVision.from_alpha(...,
implementation="scratch")`` and ``llama3vision_min.load_mini(implementation="scratch")`` give a model whose
towers are these, and answers come from ``generate.py``'s loop (the ids transformers' ``generate`` gives,
with less work per token); everything else (prompt, splice, projector) is the same code. What still comes
from transformers: the tokenizer, the image processor, and ``generate`` for the keywords the loop does not
take (beams, a repetition penalty, ...).
"""
