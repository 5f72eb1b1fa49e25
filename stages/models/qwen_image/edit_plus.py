"""The Qwen-Image-Edit Plus family (``QwenImageEditPlusPipeline``, e.g. Qwen-Image-Edit-2509): Qwen-Image-Edit with
several input images, as in diffusers' ``pipeline_qwenimage_edit_plus.py``.

What differs from ``qwen_image/edit.py``: the text encoder's template names each image ("Picture 1: <vision>Picture
2: <vision>..." before the prompt) and sees each image resized to ``calculate_dimensions(384 * 384, ratio)``
(``CONDITION_IMAGE_SIZE``); the VAE encodes each image at ``calculate_dimensions(1024 * 1024, ratio)``
(``VAE_IMAGE_SIZE``) and their packed tokens follow the noise tokens in input order, image i at frame position i + 1;
``size = auto`` follows the LAST image's ratio.
"""

from __future__ import annotations

from omni_runtime.stages.models.qwen_image.edit import QwenImageEditFamily

PIPELINE = "QwenImageEditPlusPipeline"


class QwenImageEditPlusFamily(QwenImageEditFamily):
    name = "qwen_image_edit_plus"
    pipeline_classes = (PIPELINE,)
    image_inputs = 4
    plus = True
    fields = {**QwenImageEditFamily.fields,
              "image": "1 to 4 input images (image[]): the text encoder (Qwen2.5-VL's vision tower) sees each resized "
                       "to calculate_dimensions(384*384, width/height) and then to the processor's max_pixels; the "
                       "VAE encodes each at calculate_dimensions(1024*1024, width/height) (sides multiples of 32), "
                       "whatever the output size",
              "size": "WxH: the pipeline's width=W, height=H; auto: its default, calculate_dimensions(1024*1024, "
                      "width/height) of the LAST input image"}


FAMILY = QwenImageEditPlusFamily()
