"""Trainable modality adapters (image, video, speech) composed onto the frozen tower."""
