"""Trainable modality adapters (image, video, speech) composed onto the frozen tower."""

from .checkpoint import export_hf_mllama, load_adapter, load_pretrained, save_adapter
from .fusion import FusedVisionModel, default_schedule
from .vision import VisionArgs, VisionEncoder
from .xattn import GatedCrossAttentionBlock

__all__ = [
    "FusedVisionModel",
    "GatedCrossAttentionBlock",
    "VisionArgs",
    "VisionEncoder",
    "default_schedule",
    "export_hf_mllama",
    "load_adapter",
    "load_pretrained",
    "save_adapter",
]
