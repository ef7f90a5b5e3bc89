"""Calibration data for activation-aware methods (GPTQ, AWQ, W8A8): one sampler, ``calibration_batch``."""

from llmq.calibration.data import (
    DEFAULT_SOURCE,
    CalibrationSpec,
    calibration_batch,
    check_calibration_source,
    load_calibration_texts,
)

__all__ = ["DEFAULT_SOURCE", "CalibrationSpec", "calibration_batch", "check_calibration_source", "load_calibration_texts"]
