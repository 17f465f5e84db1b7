"""Evaluation: perplexity in the papers' protocol, sparsity accounting, zero-shot accuracy (lm-eval)."""

from .perplexity import PPL_DATASETS, load_eval_tokens, perplexity
from .sparsity import sparsity_summary

__all__ = ["PPL_DATASETS", "load_eval_tokens", "perplexity", "sparsity_summary"]
