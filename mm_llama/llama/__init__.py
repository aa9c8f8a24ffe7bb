"""The frozen Llama 3 language tower: model, presets, checkpoint loading and tokenizers."""

from .checkpoint import (
    CheckpointError,
    detect_format,
    load_pretrained,
    load_source,
    random_tower,
    random_tower_source,
    read_checkpoint,
    save_meta,
)
from .config import PRESETS, ModelArgs, RopeScaling, get_preset
from .model import Transformer
from .tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ModelArgs",
    "RopeScaling",
    "Tokenizer",
    "Transformer",
    "detect_format",
    "get_preset",
    "load_pretrained",
    "load_source",
    "random_tower",
    "random_tower_source",
    "read_checkpoint",
    "save_meta",
]
