"""What every checkpoint format shares: the error type and the stream of (Meta key, tensor) pairs."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message names the file and key."""


TensorStream = Iterator[tuple[str, torch.Tensor]]
