"""What the LLM sees: tools that look inside a running model (not part of the pipeline itself).

    patch_attention(model, tokenizer, image, question)   (grid, grid): where the answer's first position looks
    patch_words(model, tokenizer, image, k=3)            the vocabulary words nearest each projected patch
    occlusion_map(model, tokenizer, image, question)     (grid, grid): how much greying each patch costs
                                                         the answer
    logit_lens(model, tokenizer, image, question)        each layer's next-token reading of the image rows

They work on either implementation of the towers (transformers' or ``scratch/``) and on any backend;
notebook 09 shows them on the miniature, with how often each one points at an object.
"""

from .attention import patch_attention
from .occlusion import occlusion_map
from .words import logit_lens, patch_words

__all__ = ["logit_lens", "occlusion_map", "patch_attention", "patch_words"]
