"""mm_llama: compositional multimodal adapters on a frozen Llama 3 tower (core, modality-agnostic)."""

__version__ = "0.2.0"
