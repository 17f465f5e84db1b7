"""llmprune: post-training pruning of large language models.

    >>> import llmprune
    >>> report = llmprune.prune(model, llmprune.PruneConfig(method="wanda", sparsity=0.5), calibration_tokens)
"""

from .calibration import CalibrationData, load_calibration
from .config import CalibrationConfig, EvalConfig, PruneConfig
from .errors import LLMPruneError
from .masks import Pattern
from .pruner import PruneReport, prune
from .scorers import SCORERS, register_scorer

__version__ = "0.1.0"

__all__ = ["prune", "PruneConfig", "PruneReport", "CalibrationConfig", "EvalConfig", "Pattern", "CalibrationData",
           "load_calibration", "LLMPruneError", "SCORERS", "register_scorer", "__version__"]
