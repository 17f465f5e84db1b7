"""Calibration plumbing: data sources, block-input capture, input statistics, the sequential block runner."""

from .data import CalibrationData, load_calibration, resolve_data_dir, token_hash
from .observe import observe
from .runner import BlockContext, run_sequential

__all__ = ["CalibrationData", "load_calibration", "resolve_data_dir", "token_hash", "observe", "BlockContext",
           "run_sequential"]
