"""Tiny, deterministic stand-ins for the real towers, for tests and offline notebooks.

Everything here is random but seeded: a SigLIP-architecture vision tower, a
Llama-architecture LM, a projector, and a byte-level BPE tokenizer trained on a few
fixed sentences that carries Llama 3's special tokens, a BOS-adding post-processor
and a Llama 3 chat template. ``build_tiny`` saves them in the ``-hf`` layout, so
tests load them through the same code path as the real checkpoint.

They answer noise: they exist to check mechanics and parity, not quality.
"""

import tempfile
from pathlib import Path

import torch

from .projector import ProjectionModule

TINY_FORMAT = 1
"""Bumped whenever the tiny stand-ins change, so stale copies in the temp folder are not reused."""

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(4)]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Renders the Llama 3 chat format: BOS, then header, two newlines, content, ``<|eot_id|>`` per turn."""

CORPUS = [
    "what is this? a red circle. a blue square. a green triangle. a yellow star. a purple cross.",
    "what colour is the shape? red. blue. green. yellow. purple. white. black. orange.",
    "what shape is it? circle. square. triangle. star. cross. there is one shape. there are two shapes.",
    "how many shapes are there? one. two. three. four. describe the picture. the picture shows a cat.",
    "user assistant system. Hello! How are you? I am fine, thank you. Please describe this image in detail.",
]

SIZES = {
    # name: (vision: image_size, patch, hidden, layers, heads) / (text: hidden, layers, heads, kv heads)
    "tiny": {"vision": (32, 8, 32, 2, 4), "text": (64, 2, 4, 2)},
    "small": {"vision": (48, 8, 48, 3, 4), "text": (96, 3, 6, 2)},
}


def tiny_tokenizer(vocab_size=400, corpus=CORPUS):
    """A byte-level BPE tokenizer with Llama 3's special tokens, trained on ``corpus``.

    Deterministic: the same corpus and size always give the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(corpus, trainer=trainer)
    core.add_special_tokens(SPECIAL_TOKENS)  # appended after the learned vocabulary, as in Llama 3
    bos = "<|begin_of_text|>"
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def tiny_configs(size="tiny", vocab_size=409, bos_token_id=None, eos_token_id=None):
    """``(SiglipVisionConfig, LlamaConfig)`` for one of the ``SIZES``."""
    from transformers import LlamaConfig, SiglipVisionConfig

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    image_size, patch, v_hidden, v_layers, v_heads = SIZES[size]["vision"]
    t_hidden, t_layers, t_heads, t_kv = SIZES[size]["text"]
    vision = SiglipVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=v_hidden, intermediate_size=2 * v_hidden,
        num_hidden_layers=v_layers, num_attention_heads=v_heads,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=t_hidden, intermediate_size=2 * t_hidden,
        num_hidden_layers=t_layers, num_attention_heads=t_heads, num_key_value_heads=t_kv,
        max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        initializer_range=0.2,  # wider than usual so random logits are far from ties
    )
    return vision, text


def tiny_parts(size="tiny", seed=0):
    """``(vision_model, text_model, mm_projector, tokenizer)``, random but seeded."""
    from transformers import LlamaForCausalLM, SiglipVisionModel

    tokenizer = tiny_tokenizer()
    vision_config, text_config = tiny_configs(size, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.eos_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vision_model = SiglipVisionModel(vision_config).eval()
        text_model = LlamaForCausalLM(text_config).eval()
        mm_projector = ProjectionModule(vision_config.hidden_size, text_config.hidden_size).eval()
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's random stream alone
    return vision_model, text_model, mm_projector, tokenizer


def build_tiny(path=None, size="tiny", seed=0):
    """Save a tiny model and its tokenizer in the -hf layout; returns the folder."""
    from .model import LlamaVision

    if path is None:
        import transformers

        major = transformers.__version__.split(".")[0]  # files written by one major version are not reused by another
        path = Path(tempfile.gettempdir()) / f"llama3vision_min-v{TINY_FORMAT}-tf{major}-{size}-seed{seed}"
    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    vision_model, text_model, mm_projector, tokenizer = tiny_parts(size, seed)
    LlamaVision(vision_model=vision_model, text_model=text_model, mm_projector=mm_projector).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tiny(size="tiny", seed=0):
    """Build (once, in the temp folder) and load a tiny model: ``(LlamaVision, tokenizer)``."""
    from .loading import load_tokenizer
    from .model import LlamaVision

    path = build_tiny(size=size, seed=seed)
    return LlamaVision.from_pretrained(path), load_tokenizer(path)
