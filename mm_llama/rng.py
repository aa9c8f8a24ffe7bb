"""Python RNG state as plain lists: what the data cursors (JSON) and training checkpoints (weights-only
`torch.load`) both store. A core utility, so the data layer needs nothing from the engine."""

from __future__ import annotations


def py_rng_state_to_list(state: tuple) -> list:
    """`random.Random.getstate()` as plain lists (JSON and weights-only torch.load both accept it)."""
    return [state[0], list(state[1]), state[2]]


def py_rng_state_from_list(state: list) -> tuple:
    version, inner, gauss = state
    return (version, tuple(inner), gauss)
