"""The Qwen2-VL image processor, native when ``csrc/`` is built; Hugging Face's otherwise.

``NativeQwen2VLImageProcessor`` is transformers' ``Qwen2VLImageProcessorPil`` with the work after
RGB conversion done by the C++ extension ``visurf_engine._qwen2vl_image`` in one pass per image,
OpenMP-parallel over ``torch.get_num_threads()`` threads, the GIL released:

- size: ``smart_resize(H, W, factor=p*m, min_pixels, max_pixels)``, transformers' rounding;
- resample: Pillow's bicubic filter, reproduced with its fixed-point arithmetic and the pass
  order of the installed Pillow version (bit-exact);
- value: ``lut[c, level]``, the 256 levels of each channel put through this processor's own
  ``rescale`` (x / 255) and ``normalize`` ((x - mean_c) / std_c, float32), so bit-exact too;
- layout: repeated ``T = temporal_patch_size`` times and patchified as transformers does,
  ``pixel_values [sum_i h_i w_i / p^2, 3 * T * p^2]`` float32 and ``image_grid_thw [images, 3]``.

So the output equals HF's exactly. Inputs the extension does not handle (a resample other than
bicubic, ``do_resize=False``, float or non-RGB arrays) go through HF's code unchanged.
``image_processor_class`` picks the class for ``model.image_processor``; when the extension is
not built, ``native`` falls back to HF's with one warning per process.
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

try:
    from .. import _qwen2vl_image as _native

    _NATIVE_ERROR = None
except ImportError as e:  # not built: no compiler at install time
    _native, _NATIVE_ERROR = None, e

KINDS = ("native", "hf")
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
_warned = False


class NativeQwen2VLImageProcessor(Qwen2VLImageProcessorPil):
    """``Qwen2VLImageProcessorPil`` with ``_preprocess`` in C++; same outputs, saved as HF's class."""

    def convert_to_rgb(self, image, input_data_format=None):
        """RGB PIL images without transparency as one array (HF copies them three times)."""
        if isinstance(image, Image.Image) and image.mode == "RGB" and image.info.get("transparency") is None:
            return np.asarray(image)
        return super().convert_to_rgb(image, input_data_format=input_data_format)

    def _preprocess(self, images, do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean,
                    image_std, patch_size, temporal_patch_size, merge_size, return_tensors, **kwargs) -> BatchFeature:
        """``images``: [3, H, W] uint8 arrays (``process_image``'s output) -> pixel_values, image_grid_thw."""
        native = (
            do_resize
            and resample == PILImageResampling.BICUBIC
            and size.shortest_edge
            and size.longest_edge
            and all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[0] == 3 for im in images)
        )
        if not native:
            return super()._preprocess(
                images, do_resize=do_resize, size=size, resample=resample, do_rescale=do_rescale,
                rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
                image_std=image_std, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                merge_size=merge_size, return_tensors=return_tensors, **kwargs,
            )  # fmt: skip
        levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
        if do_rescale:
            levels = self.rescale(levels, rescale_factor)
        if do_normalize:
            levels = self.normalize(levels, image_mean, image_std)
        lut = np.ascontiguousarray(levels, dtype=np.float32).reshape(3, 256)
        hwc = [np.ascontiguousarray(np.moveaxis(im, 0, -1)) for im in images]
        pixel_values, grid = _native.encode(
            hwc, lut, patch_size, merge_size, temporal_patch_size, size.shortest_edge, size.longest_edge, PILLOW_MAJOR,
            torch.get_num_threads(),
        )  # fmt: skip
        return BatchFeature(data={"pixel_values": pixel_values, "image_grid_thw": grid}, tensor_type=return_tensors)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["image_processor_type"] = "Qwen2VLImageProcessor"  # as HF's saves it: any loader reads it back
        return out


def image_processor_class(kind: str = "native") -> type[Qwen2VLImageProcessorPil]:
    """The class for ``model.image_processor``: ``hf``, or ``native`` (HF's, warned once, when not built)."""
    global _warned
    if kind not in KINDS:
        raise ValueError(f"image processor {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "hf":
        return Qwen2VLImageProcessorPil
    if _native is not None:
        return NativeQwen2VLImageProcessor
    if not _warned:
        _warned = True
        warnings.warn(
            f"the native image pipeline (csrc/) is not built ({_NATIVE_ERROR}); using the Hugging Face image "
            "processor, several times slower. Build it with a C++17 compiler: pip install -e .",
            RuntimeWarning,
            stacklevel=2,
        )
    return Qwen2VLImageProcessorPil
