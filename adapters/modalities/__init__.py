"""Modality plug-ins: one module each (image, video, speech); adapters/registry.py lists them."""
