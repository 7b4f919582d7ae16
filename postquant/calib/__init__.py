"""Calibration sources, observers and activation ranges."""

from postquant.calib.act_ranges import ActRanges, calibrate_from_data, calibrate_reference_noise
from postquant.calib.data import as_calibration, collect_batches, forward_all, run_model
from postquant.calib.observers import Observer, RangeObserver

__all__ = [
    "ActRanges",
    "Observer",
    "RangeObserver",
    "as_calibration",
    "calibrate_from_data",
    "calibrate_reference_noise",
    "collect_batches",
    "forward_all",
    "run_model",
]
