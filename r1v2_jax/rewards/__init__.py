"""Hybrid rewards: rule-based verifier, format reward, reward models, calibration."""
