"""Step 3 of the pipeline: picture -> pixel values -> SigLIP patch features.

    PIL image (any mode, any size)
      -> RGB
      -> resize to image_size x image_size (bicubic), rescale to [0, 1], normalise with mean 0.5 / std 0.5
      -> pixel_values                              (n_images, 3, 384, 384)
      -> SigLIP encoder, output of the second-to-last layer
      -> features                                  (n_images, 729, 1152)

SigLIP has no CLS token, so all 27 x 27 = 729 tokens are patches and all are kept.
The second-to-last layer is used (as in LLaVA) because the last layer is shaped by the
contrastive objective, while the one before it keeps more local detail.

Sources:

* the official ``answer_question`` in ``modeling_llamavision.py`` (processor call, ``hidden_states[-2]``):
  https://huggingface.co/qresearch/llama-3-vision-alpha-hf/blob/main/modeling_llamavision.py
* SigLIP, the vision tower: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv 2303.15343;
  transformers' ``SiglipVisionModel`` in ``models/siglip/modeling_siglip.py``
* the second-to-last layer: LLaVA's ``feature_select`` in ``llava/model/multimodal_encoder/clip_encoder.py``
  (``mm_vision_select_layer = -2``), studied in LLaVA-1.5, arXiv 2310.03744
"""

import PIL.Image
import transformers


def make_processor(image_size):
    """A SigLIP image processor that resizes to ``image_size`` (bicubic, mean/std 0.5).

    transformers 5 offers a PIL-backed class next to the torchvision one; the PIL one
    matches the processor the original ran with and needs no torchvision.
    """
    processor_class = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return processor_class(size={"height": image_size, "width": image_size})


def to_rgb(image):
    """Check that ``image`` is a PIL image and convert it to RGB, as the original does."""
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    return image.convert("RGB")


def preprocess_images(images, processor, image_size):
    """PIL images -> normalised ``pixel_values`` of shape (n_images, 3, image_size, image_size)."""
    rgb = [to_rgb(image) for image in images]
    size = {"height": image_size, "width": image_size}
    # Say where the channels are: left to guess, transformers 4.x misreads pictures 1 or 3 pixels high.
    return processor(images=rgb, return_tensors="pt", do_resize=True, size=size,
                     input_data_format="channels_last")["pixel_values"]


def vision_features(vision_model, pixel_values):
    """Patch features from the second-to-last encoder layer: (n_images, n_patches, vision_hidden)."""
    first = next(vision_model.parameters())
    pixel_values = pixel_values.to(device=first.device, dtype=first.dtype)
    outputs = vision_model(pixel_values, output_hidden_states=True)
    return outputs.hidden_states[-2]  # (n_images, 729, 1152) for so400m at 384 px
