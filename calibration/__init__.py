"""Calibration data from guided sampler trajectories, and the INT8 paths. Never imports torch."""
