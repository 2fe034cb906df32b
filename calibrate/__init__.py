"""Calibration data, block-input capture with sequential replay, and statistics collectors."""

from calibrate.blocks import BlockInputs, decoder_blocks, run_block
from calibrate.capture import capture_first_block_inputs
from calibrate.data import CalibConfig, load_calibration
from calibrate.stats import ChannelStats, HessianCollector

__all__ = [
    "BlockInputs",
    "CalibConfig",
    "ChannelStats",
    "HessianCollector",
    "capture_first_block_inputs",
    "decoder_blocks",
    "load_calibration",
    "run_block",
]
