"""DeepSpec-style drafter training: target-regenerated data, losses, training loop, calibration."""
