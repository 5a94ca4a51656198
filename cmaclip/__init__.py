"""CMA-CLIP: multi-task image-text classification with cross-modality attention, on Ray."""

__version__ = "0.1.0"
