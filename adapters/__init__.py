"""Trainable modality parts (image, video, speech) composed onto the frozen tower: one model, one forward."""

from .composed import ComposedModel, ModelOutput
from .files import adapter_kind, load_composed, read_adapter_meta, save_part
from .hf_mllama import export_hf_mllama, load_pretrained
from .image import ImagePart, build_image_part, default_schedule
from .vision import VisionArgs, VisionEncoder
from .xattn import GatedCrossAttentionBlock

__all__ = [
    "ComposedModel",
    "GatedCrossAttentionBlock",
    "ImagePart",
    "ModelOutput",
    "VisionArgs",
    "VisionEncoder",
    "adapter_kind",
    "build_image_part",
    "default_schedule",
    "export_hf_mllama",
    "load_composed",
    "load_pretrained",
    "read_adapter_meta",
    "save_part",
]

from . import modalities  # noqa: E402, F401 - registers the built-in plug-ins
