"""Calibration: train the draft and the exit predictors, choose the schedule, report.

    examples (ShareGPT or --calib JSONL)
      -> teacher-forced target passes (collect.py)
      -> draft training on full-depth and exit-layer features (draft.py)
      -> predictor features + labels at every layer, one MLP per layer (predictors.py)
      -> offline schedule: layers ranked by exit frequency, top-N chosen by measurement
      -> artifact (safetensors + JSON), cached per model content and settings
"""

from specee_compile.calibrate.pipeline import CalibrationSettings, calibrate, load_calibration

__all__ = ["CalibrationSettings", "calibrate", "load_calibration"]
