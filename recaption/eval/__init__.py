"""Evaluation: retrieval, zero-shot classification, benchmark loaders and the synthetic scene benchmark."""
