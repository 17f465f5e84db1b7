"""Weight scorers. Each method is one module plus its `@register_scorer` line; importing here registers it."""

from . import magnitude, ria, sparsegpt, wanda  # noqa: F401  (registration)
from .base import SCORERS, LayerStats, PruneResult, Scorer, register_scorer

__all__ = ["SCORERS", "LayerStats", "PruneResult", "Scorer", "register_scorer"]
