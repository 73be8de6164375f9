"""Random, seeded stand-ins for the real towers: the same architectures at any size, untrained.

The tests, the benchmark and the offline notebooks need a SigLIP tower, a Llama 3 LLM, a projector
and a tokenizer without downloading 16 GB. Everything here is random but seeded:

* ``Geometry``, ``SIZES`` and ``make_configs``: the one place where a size becomes the two
  transformers configs (``SiglipVisionConfig``, ``LlamaConfig``), for the tiny stand-ins, the
  benchmark's medium and real geometry, and the miniature's recipe (``stages.py``);
* ``tiny_tokenizer``: a byte-level BPE tokenizer trained on a few fixed sentences that carries
  Llama 3's special tokens, a BOS-adding post-processor and a Llama 3 chat template;
* ``random_parts``: ``(vision_model, text_model, mm_projector, tokenizer)`` of one size;
* ``build_tiny`` / ``load_tiny``: a stand-in saved in the ``-hf`` layout, so tests load it through
  the same code path as the real checkpoint.

They answer noise: they exist to check mechanics, parity and speed, not quality. The miniature
(``stages.py``) trains the same architectures into a model that answers.
"""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..constants import EOT_TOKEN
from ..projector import ProjectionModule

TINY_FORMAT = 1
"""Bumped whenever the tiny stand-ins change, so stale copies in the temp folder are not reused."""

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT_TOKEN,
] + [f"<|reserved_special_token_{i}|>" for i in range(4)]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '"
    + EOT_TOKEN + "' }}"
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


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes of both towers. The real model: ``SIZES["real"]`` with 27 vision and 32 text layers."""

    # SigLIP vision tower
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    # Llama 3 LLM
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    max_positions: int
    vocab_size: int | None = None  # None: the tokenizer's size
    rms_norm_eps: float = 1e-6  # LlamaConfig's default; Llama 3 itself uses 1e-5
    initializer_range: float = 0.02  # LlamaConfig's default

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2


SIZES = {
    # initializer_range 0.2: wider than usual so random logits are far from ties
    "tiny": Geometry(image_size=32, patch_size=8, vision_hidden=32, vision_intermediate=64, vision_layers=2,
                     vision_heads=4, text_hidden=64, text_intermediate=128, text_layers=2, text_heads=4,
                     text_kv_heads=2, max_positions=512, initializer_range=0.2),
    "small": Geometry(image_size=48, patch_size=8, vision_hidden=48, vision_intermediate=96, vision_layers=3,
                      vision_heads=4, text_hidden=96, text_intermediate=192, text_layers=3, text_heads=6,
                      text_kv_heads=2, max_positions=512, initializer_range=0.2),
    # the benchmark's sizes: SigLIP 224 px / patch 14 (256 patches); the real geometry with two layers each
    "medium": Geometry(image_size=224, patch_size=14, vision_hidden=384, vision_intermediate=1536,
                       vision_layers=4, vision_heads=6, text_hidden=512, text_intermediate=1536,
                       text_layers=6, text_heads=8, text_kv_heads=4, max_positions=2048, rms_norm_eps=1e-5),
    "real": Geometry(image_size=384, patch_size=14, vision_hidden=1152, vision_intermediate=4304,
                     vision_layers=2, vision_heads=16, text_hidden=4096, text_intermediate=14336,
                     text_layers=2, text_heads=32, text_kv_heads=8, max_positions=8192, vocab_size=128256,
                     rms_norm_eps=1e-5),
}
"""The stand-ins' sizes. tiny and small are built by real random initialisation; medium and real
(about 1.9 B parameters) are filled by tiling a random pool (``fill_by_tiling``)."""


def make_configs(size="tiny", vocab_size=None, bos_token_id=None, eos_token_id=None):
    """``(SiglipVisionConfig, LlamaConfig)`` for a name in ``SIZES`` or a ``Geometry``.

    Llama 3's choices are fixed here: RoPE theta 500000, an untied output head.
    """
    from transformers import LlamaConfig, SiglipVisionConfig

    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)} or a Geometry, got {size!r}")
        size = SIZES[size]
    vision = SiglipVisionConfig(
        image_size=size.image_size, patch_size=size.patch_size, hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
    )
    text = LlamaConfig(
        vocab_size=size.vocab_size or vocab_size, hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate, num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads, num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_positions, rope_theta=500000.0, tie_word_embeddings=False,
        rms_norm_eps=size.rms_norm_eps, initializer_range=size.initializer_range,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    return vision, text


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


def fill_by_tiling(module, pool, dtype):
    """Give every meta parameter real storage: norms 1, biases 0, other weights tiled from ``pool``.

    Random initialisation of ~1.9 B parameters takes longer than a benchmark; tiling is instant.
    Buffers (rotary frequencies, SigLIP's position ids) are left as they are.
    """
    for module_name, sub in module.named_modules():
        is_norm = "norm" in module_name.rsplit(".", 1)[-1].lower() or "norm" in type(sub).__name__.lower()
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            tensor = torch.empty(param.shape, dtype=dtype)
            if is_norm and name == "weight":
                tensor.fill_(1.0)
            elif name == "bias":
                tensor.zero_()
            else:
                flat = tensor.view(-1)
                for start in range(0, flat.numel(), pool.numel()):
                    end = min(start + pool.numel(), flat.numel())
                    flat[start:end].copy_(pool[: end - start])
            sub._parameters[name] = nn.Parameter(tensor)
    return module


def random_parts(size="tiny", seed=0, dtype=None):
    """``(vision_model, text_model, mm_projector, tokenizer)`` of one size, random but seeded, in eval mode.

    ``size``: a name in ``SIZES`` or a ``Geometry``. tiny and small are initialised the way
    transformers initialises; any other size is built on the meta device and filled by tiling
    (``fill_by_tiling``). The caller's random stream is left alone.
    """
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM, SiglipVisionModel

    tokenizer = tiny_tokenizer()
    vision_config, text_config = make_configs(size, vocab_size=len(tokenizer),
                                              bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if size in ("tiny", "small"):
            vision_model = SiglipVisionModel(vision_config)
            text_model = LlamaForCausalLM(text_config)
        else:
            with init_empty_weights(include_buffers=False):  # rotary / position-id buffers stay real
                vision_model = SiglipVisionModel(vision_config)
                text_model = LlamaForCausalLM(text_config)
            generator = torch.Generator().manual_seed(seed)
            pool = (torch.randn(1_000_003, generator=generator)  # prime length
                    * 0.02).to(dtype or torch.float32)
            vision_model = fill_by_tiling(vision_model, pool, dtype or torch.float32)
            text_model = fill_by_tiling(text_model, pool, dtype or torch.float32)
            torch.manual_seed(seed)  # the meta-device construction above drew from the stream
        mm_projector = ProjectionModule(vision_config.hidden_size, text_config.hidden_size)
    parts = (vision_model, text_model, mm_projector)
    if dtype is not None:
        parts = tuple(part.to(dtype) for part in parts)
    return (*(part.eval() for part in parts), tokenizer)


def private_cache():
    """``$XDG_CACHE_HOME/llama3vision_min`` (``~/.cache`` without it), this user's own: refused when another
    user could write into it, since what lies there is loaded as ours (a shared temp folder could be
    planted)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3vision_min"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = cache.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ValueError(f"{cache} must belong to you and be writable by you alone "
                         f"(owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)})")
    return cache


def build_tiny(path=None, size="tiny", seed=0):
    """Save a tiny model and its tokenizer in the -hf layout; returns the folder. Without ``path``: once, in
    ``private_cache()``, written beside its place and renamed (processes building it at once each get a
    whole one)."""
    from ..model import LlamaVision

    if path is None:
        import transformers

        # files written by one major version are not reused by another
        major = transformers.__version__.split(".")[0]
        path = private_cache() / f"tiny-v{TINY_FORMAT}-tf{major}-{size}-seed{seed}"
    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    vision_model, text_model, mm_projector, tokenizer = random_parts(size, seed)
    LlamaVision(vision_model=vision_model, text_model=text_model,
                mm_projector=mm_projector).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(path)  # replaces an empty folder
    except OSError:  # another process finished first: its copy is the same model
        shutil.rmtree(partial, ignore_errors=True)
        if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} holds something other than a tiny model: remove it") from None
    return path


def load_tiny(size="tiny", seed=0):
    """Build (once, in the temp folder) and load a tiny model: ``(LlamaVision, tokenizer)``."""
    from ..loading import load_tokenizer
    from ..model import LlamaVision

    path = build_tiny(size=size, seed=seed)
    return LlamaVision.from_pretrained(path), load_tokenizer(path)
