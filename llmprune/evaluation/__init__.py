"""Evaluation: perplexity in the papers' protocol, zero-shot accuracy (lm-eval), sparsity and compression
accounting (`compression`)."""

from .perplexity import PPL_DATASETS, load_eval_tokens, perplexity

__all__ = ["PPL_DATASETS", "load_eval_tokens", "perplexity"]
