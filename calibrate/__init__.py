"""Calibration data and statistics shared by every calibrated pass."""

from calibrate.data import CalibConfig, load_calibration

__all__ = ["CalibConfig", "load_calibration"]
