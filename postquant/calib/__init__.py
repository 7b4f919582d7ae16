"""Calibration sources, observers and activation ranges."""

from postquant.calib.act_ranges import ActRanges, calibrate_from_data, calibrate_reference_noise
from postquant.calib.augment import Augmentation, augment_batches
from postquant.calib.data import as_calibration, collect_batches, forward_all, run_model
from postquant.calib.observers import Observer, RangeObserver, make_observer
from postquant.calib.synthetic import bn_statistics_loss, distill_bn_data, noise_data

__all__ = [
    "ActRanges",
    "Augmentation",
    "Observer",
    "RangeObserver",
    "as_calibration",
    "augment_batches",
    "bn_statistics_loss",
    "calibrate_from_data",
    "calibrate_reference_noise",
    "collect_batches",
    "distill_bn_data",
    "forward_all",
    "make_observer",
    "noise_data",
    "run_model",
]
