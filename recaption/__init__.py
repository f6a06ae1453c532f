"""recaption: re-caption image datasets with multimodal LLMs at cluster scale."""

__version__ = "0.1.0"
