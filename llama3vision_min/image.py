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

import threading

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import transformers


RECORDING = threading.RLock()
"""Held while a transformers model runs with ``output_hidden_states`` (or attentions): 4.57 records them by
swapping its layers' ``forward`` for the call, so two threads at once would read each other's layers."""

PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
"""The file formats the command line and the trainer open: never PostScript, which Pillow renders by
running Ghostscript."""


def make_processor(image_size):
    """A SigLIP image processor that resizes to ``image_size`` (bicubic, mean/std 0.5).

    transformers 5 offers a PIL-backed class next to the torchvision one; the PIL one
    matches the processor the original ran with and needs no torchvision.
    """
    pil_backed = getattr(transformers, "SiglipImageProcessorPil", None)
    return (pil_backed or transformers.SiglipImageProcessor)(size={"height": image_size, "width": image_size})


def to_rgb(image):
    """``image`` as 8-bit RGB without transparency, by one rule whatever transformers version reads it.

    The original calls ``convert("RGB")``, which drops alpha (transparent pixels show whatever colour
    they store), keeps a palette's ``transparency`` (which transformers 5's processor then blends, 4.x
    does not) and saturates 16-bit values (most such pictures turn white). Here, instead:

    * EXIF orientation is applied, as every viewer shows a photograph;
    * transparency (alpha, or a palette's transparent colour) is composited onto white;
    * 16-bit and 32-bit integer pictures are scaled from 0..65535 to 0..255; float pictures are read
      as 0..1 when all their values lie there, else as 0..255 (clipped);
    * an empty picture, one over PIL's ``MAX_IMAGE_PIXELS`` (a decompression bomb), one whose file is
      damaged (read lazily, a truncated PNG fails only here) and PostScript (which Pillow hands to
      Ghostscript, a program of its own) are refused.

    On an opaque 8-bit picture this is the original's ``convert("RGB")``.
    """
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"expected a picture of at least 1 x 1 pixels, got {width} x {height}")
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ValueError(f"refusing a {width} x {height} picture: more than PIL's MAX_IMAGE_PIXELS ({limit}) "
                         "pixels, as a decompression bomb would be")
    if image.format in ("EPS", "PS"):
        raise ValueError(f"refusing a {image.format} picture: Pillow reads PostScript by running Ghostscript")
    try:
        image.load()  # a file opened lazily is read here: damage shows now, not inside the processor
    except OSError as error:
        raise ValueError(f"the picture cannot be read: {error}") from None
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8_bit(image)
    if image.mode in ("RGBA", "LA", "PA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba)
    rgb = image.convert("RGB")
    rgb.info.pop("transparency", None)  # nothing left for a processor to blend
    return rgb


def _to_8_bit(image):
    """A 16/32-bit integer or float single-channel picture as 8-bit grey (mode L), by ``to_rgb``'s rule."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values)
        values = values * 255 if values.size and values.min() >= 0 and values.max() <= 1 else values
    else:
        values = values / 257  # 0..65535 onto 0..255
    return PIL.Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def preprocess_images(images, processor, image_size):
    """PIL images -> normalised ``pixel_values`` of shape (n_images, 3, image_size, image_size)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"expected a non-empty list of pictures, got {images!r:.80}")
    rgb = [to_rgb(image) for image in images]
    size = {"height": image_size, "width": image_size}
    # Say where the channels are: left to guess, transformers 4.x misreads pictures 1 or 3 pixels high.
    return processor(images=rgb, return_tensors="pt", do_resize=True, size=size,
                     input_data_format="channels_last")["pixel_values"]


def vision_features(vision_model, pixel_values):
    """Patch features from the second-to-last encoder layer: (n_images, n_patches, vision_hidden)."""
    _check_pixel_values(pixel_values, vision_model.config.image_size)
    first = next(vision_model.parameters())
    pixel_values = pixel_values.to(device=first.device, dtype=first.dtype)
    with RECORDING:  # one such call at a time: transformers 4.57 records by swapping layers' forward
        outputs = vision_model(pixel_values, output_hidden_states=True)
    return outputs.hidden_states[-2]  # (n_images, 729, 1152) for so400m at 384 px


def _check_pixel_values(pixel_values, size):
    """Pictures the tower can read: a float tensor of shape (n_images >= 1, 3, size, size)."""
    if not (isinstance(pixel_values, torch.Tensor) and pixel_values.is_floating_point()
            and pixel_values.dim() == 4 and pixel_values.shape[0] > 0
            and tuple(pixel_values.shape[1:]) == (3, size, size)):
        raise ValueError(f"pixel_values must be a float tensor of shape (n_images, 3, {size}, {size}), got "
                         f"{tuple(getattr(pixel_values, 'shape', ()))} "
                         f"{getattr(pixel_values, 'dtype', type(pixel_values))}")
