"""Step 7 of the pipeline: the model -- a frozen SigLIP tower, a trained projector and a frozen Llama 3.

    picture --SigLIP--> (n, 729, 1152) --projector--> (n, 729, 4096) --.
    prompt --tokenizer_image_token--> ids with -200 --embed + splice--> (batch, T, 4096) --Llama 3--> answer

``LlamaVision`` keeps the attribute and method names of the official remote model
(``text_model``, ``vision_model``, ``mm_projector``, ``processor``,
``tokenizer_image_token``, ``process_tensors``, ``answer_question``) so code written
for one runs on the other -- without ``trust_remote_code``. The class reads top to bottom:
the parts, the picture's path, the forward pass, generation; loading and saving come last
(``loading.py``, step 8, reads the files; the device and dtype are chosen here).

Sources:

* the official model class in ``modeling_llamavision.py``
  (https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py)
* LLaVA's ``LlavaMetaForCausalLM`` in ``llava/model/llava_arch.py`` (``encode_images``, the splice
  before the LLM): https://github.com/haotian-liu/LLaVA/blob/main/llava/model/llava_arch.py
* transformers' ``LlavaForConditionalGeneration`` in ``models/llava/modeling_llava.py``, which holds
  the same model exactly (``tests/parity/test_parity_llava.py``)
* the papers: LLaVA, arXiv 2304.08485, and LLaVA-1.5, arXiv 2310.03744 (the recipe); SigLIP,
  arXiv 2303.15343 (the tower); Llama 3, arXiv 2407.21783 (the LLM)
"""

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from . import loading
from .constants import IMAGE_TOKEN_INDEX
from .chat import CachedChat, ChatSession
from .generation import cut_at_stop, generation_kwargs, own_loop
from .image import make_processor, preprocess_images, vision_features
from .prompt import chat_segments
from .scratch.generate import generate as scratch_generate
from .scratch.weights import check_implementation, take_over
from .splice import process_tensors, splice_batch
from .token_split import prompt_ids, tokenizer_image_token


class LlamaVision(nn.Module):
    """Any SigLIP-style vision model + any Llama-style causal LM + a ``ProjectionModule``."""

    def __init__(self, vision_model, text_model, mm_projector, processor=None):
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        self.mm_projector = mm_projector
        self.processor = processor if processor is not None else make_processor(self.image_size)

    # The official model exposes the two helpers as methods too.
    tokenizer_image_token = staticmethod(tokenizer_image_token)
    process_tensors = staticmethod(process_tensors)

    @property
    def image_size(self):
        return self.vision_model.config.image_size

    @property
    def device(self):
        return self.text_model.get_input_embeddings().weight.device

    # -- the picture's path: pixels -> SigLIP features -> projected vectors ----------------
    def preprocess(self, images):
        """PIL images -> pixel values (n_images, 3, image_size, image_size)."""
        return preprocess_images(images, self.processor, self.image_size)

    def project(self, vision_feats):
        """Run the projector in its own dtype; returns (n_images, n_patches, text_hidden)."""
        weight = self.mm_projector.model[0].weight
        return self.mm_projector(vision_feats.to(device=weight.device, dtype=weight.dtype))

    def encode_images(self, pixel_values):
        """Pixel values -> projected image features (n_images, n_patches, text_hidden)."""
        return self.project(vision_features(self.vision_model, pixel_values))

    # -- the forward pass (training and scoring) -------------------------------------------
    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                vision_features=None, padding_side="right", **kwargs):
        """Logits (and, with ``labels``, the loss) for prompts that contain ``-200`` sentinels.

        input_ids:       (batch, L) ids with one sentinel per image
        pixel_values:    (n_images, 3, H, W), images in reading order of the sentinels
        vision_features: (n_images, n_patches, vision_hidden), instead of ``pixel_values``
                         (cached features of the frozen vision tower, for training)
        labels:          (batch, L) with -100 on prompt positions; image positions get -100 here.
                         The loss is the mean cross-entropy over the positions that are not -100.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values or vision_features")
            image_features = self.encode_images(pixel_values)
        else:
            image_features = self.project(vision_features)
        batch = self.splice(input_ids, image_features, attention_mask=attention_mask, labels=labels,
                            padding_side=padding_side)
        return self.text_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, labels=batch.labels, **kwargs)

    def splice(self, input_ids, image_features, **kwargs):
        """``splice_batch`` into this LLM's embeddings, refusing a sequence longer than the LLM's context."""
        batch = splice_batch(input_ids, image_features, self.text_model.get_input_embeddings(), **kwargs)
        limit = getattr(self.text_model.config, "max_position_embeddings", None)
        longest = int(batch.attention_mask.sum(-1).max())
        if limit and longest > limit:
            raise ValueError(f"the prompt is {longest} positions long (its text and "
                             f"{image_features.shape[1]} rows per picture), but the LLM reads at most "
                             f"{limit}: shorten it")
        return batch

    # -- generation --------------------------------------------------------------------------
    def prepare(self, conversations, images, tokenizer, special_tokens_in_text=False):
        """Conversations and their pictures -> ``(ids, batch)``: the one path from text and pixels to what
        the LLM reads (generation, ``CachedChat`` and ``lens`` all start here).

        conversations: ``[[(question, answer), ..., (question, None)], ...]``, the picture in the first
                       user turn (``prompt.chat_segments``); images: one picture per conversation.
        ids:           one 1-D tensor per conversation, with its ``-200``
        batch:         the ``SplicedBatch``, left-padded so every prompt ends where generation begins
        What people wrote is read as text, even ``<|eot_id|>`` typed in a question; pass
        ``special_tokens_in_text=True`` to read it as the original does.
        """
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(f"expected a non-empty list of conversations, got {conversations!r}")
        if not isinstance(images, (list, tuple)) or len(images) != len(conversations):
            raise ValueError(f"expected one picture per conversation ({len(conversations)}), "
                             f"got {images!r:.80}")
        ids = [prompt_ids(chat_segments(turns), tokenizer, special_tokens_in_text) for turns in conversations]
        image_features = self.encode_images(self.preprocess(images))  # (n_images, n_patches, hidden)
        return ids, self.splice(ids, image_features, padding_side="left")  # (batch, T, hidden)

    @torch.inference_mode()
    def generate_from_conversations(self, conversations, images, tokenizer, special_tokens_in_text=False,
                                    **generate_kwargs):
        """Generate the next answer of each conversation about its picture (``prepare`` says how they are
        read); returns one 1-D id tensor per conversation."""
        kwargs = generation_kwargs(tokenizer, generate_kwargs)
        _, batch = self.prepare(conversations, images, tokenizer, special_tokens_in_text)
        own = own_loop(self.text_model, kwargs)
        if own is not None:  # the from-scratch towers' own loop (scratch/generate.py): (batch, n_new)
            new_tokens, _ = scratch_generate(self.text_model, batch.inputs_embeds, batch.attention_mask,
                                             **own)
        else:  # with only inputs_embeds, generate returns the new tokens alone: (batch, n_new)
            new_tokens = self.text_model.generate(inputs_embeds=batch.inputs_embeds,
                                                  attention_mask=batch.attention_mask, **kwargs)
        # Rows that stopped early are padded; cut each after the stop ids generate actually used.
        stops = kwargs["eos_token_id"]
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        return [cut_at_stop(row, stops) for row in new_tokens]

    def answer_question(self, image, question, tokenizer, **generate_kwargs):
        """Answer one question about one picture; returns the generated ids (1-D), like the original.

        Decode them with ``tokenizer.decode(ids, skip_special_tokens=True)``. Sampling at
        temperature 0.2 by default; pass ``do_sample=False`` for greedy, ``streamer=`` to stream.
        """
        return self.generate_from_conversations([[(question, None)]], [image], tokenizer,
                                                **generate_kwargs)[0]

    def answer_questions(self, images, questions, tokenizer, **generate_kwargs):
        """Answer a batch: ``questions[i]`` about ``images[i]``, all in one left-padded ``generate`` call."""
        for name, value in (("images", images), ("questions", questions)):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, one per picture; got a {type(value).__name__}")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        conversations = [[(question, None)] for question in questions]
        return self.generate_from_conversations(conversations, images, tokenizer, **generate_kwargs)

    def chat(self, image, tokenizer, reuse_cache=False, **generate_kwargs):
        """Start a multi-turn conversation about ``image``; ``session.ask(question)`` returns each answer.

        ``reuse_cache=False``: a ``ChatSession``, which runs the whole conversation again every
        turn (simplest). ``reuse_cache=True``: a ``CachedChat``, which keeps the KV cache so a
        follow-up only runs its new tokens (same answers, much faster at real size).
        """
        if reuse_cache:
            return CachedChat(self, image, tokenizer, **generate_kwargs)
        return ChatSession(self, image, tokenizer, **generate_kwargs)

    # -- loading and saving: loading.py reads the files; here the model is placed ------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=None, device=None, implementation="transformers"):
        """Load a checkpoint in the ``-hf`` layout (a local folder or a Hub id).

        By default on the GPU when there is one, in float16 there; on a CPU in bfloat16 where it computes it,
        else float32 (``choose_dtype``). ``implementation="scratch"``: the towers are ``scratch/``'s.
        """
        check_implementation(implementation)
        with loading.BUILDING:  # one load at a time (see loading.BUILDING): safe from several threads
            model = loading.load_hf_layout(cls, path_or_hub_id)  # on the CPU, as stored
            device, stored = choose_device(device), model.mm_projector.model[0].weight.dtype
            model.to(device=device, dtype=dtype or choose_dtype(device, stored))
            return take_over(model, implementation)

    @classmethod
    def from_alpha(cls, llm, vision, projector, dtype=None, device=None, load_in_4bit=False,
                   load_in_8bit=False, implementation="transformers"):
        """Assemble from the alpha form: a Llama 3 LLM, a SigLIP model and a projector file.

        Swapping the LLM is changing ``llm``: the projector is reused as it is. Device and dtype as for
        ``from_pretrained`` (the dtype chosen for the LLM's stored one); ``load_in_4bit`` quantises the LLM
        (bitsandbytes, on a GPU or a CPU).
        """
        check_implementation(implementation)
        device = choose_device(device)
        dtype = dtype or choose_dtype(device, stored_dtype(llm))
        with loading.BUILDING:
            model = loading.load_alpha_form(cls, llm, vision, projector, dtype, device, load_in_4bit,
                                            load_in_8bit)
            return take_over(model, implementation)

    def save_pretrained(self, path, max_shard_size="5GB"):
        """Write this model in the ``-hf`` layout that ``from_pretrained`` reads: SigLIP's keys nested, as
        transformers 4.x (the official checkpoint's era) writes them, a tied head stored once.
        ``huggingface_hub`` writes the shards and deletes an earlier save's (a stale index would be read)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": "llamavision", "architectures": ["LlamaVision"],
                  "image_token_index": IMAGE_TOKEN_INDEX,
                  "text_config": with_legacy_rope(self.text_model.config.to_dict()),
                  "vision_config": self.vision_model.config.to_dict()}
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {loading.model_key(key, nested_siglip=True): tensor.detach().contiguous().cpu()
                 for key, tensor in self.state_dict().items()}
        if getattr(self.text_model.config, "tie_word_embeddings", False):
            state.pop("text_model.lm_head.weight", None)
        save_torch_state_dict(state, folder, max_shard_size=max_shard_size)


# -- where, and in what precision ------------------------------------------------------------------
def choose_device(device=None):
    """``device`` as given; by default the first GPU when there is one, else the CPU."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def cpu_computes_bfloat16():
    """True when this CPU has bfloat16 instructions (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_dtype(device, stored=torch.float32):
    """float16 on a GPU, as the original runs. On a CPU float32 weights stay float32, and half precision
    becomes bfloat16 where the CPU computes it, else float32 (a CPU's float16 matmuls are far slower)."""
    if torch.device(device).type == "cuda":
        return torch.float16
    if stored in (None, torch.float32, torch.float64) or not cpu_computes_bfloat16():
        return torch.float32
    return torch.bfloat16


def stored_dtype(llm):
    """The dtype an LLM's ``config.json`` says its weights are stored in (None when it does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llm, trust_remote_code=False)  # never a folder's own code
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # torch_dtype in 4.x
    return getattr(torch, stored) if isinstance(stored, str) else stored


def with_legacy_rope(text_config):
    """A text-config dict that transformers 4.x reads with the right RoPE too: 5.x writes ``rope_parameters``,
    which 4.x does not know (it would use theta 10000; Llama 3's is 500000), so ``rope_theta`` (and
    ``rope_scaling`` for a non-default RoPE) are added; 5.x reads them too."""
    config = dict(text_config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return config

