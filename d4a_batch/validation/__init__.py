"""Validation against the truth: image metrics, posterior calibration, baselines, experiments."""
