"""PyTorch baselines used for parity checks."""
