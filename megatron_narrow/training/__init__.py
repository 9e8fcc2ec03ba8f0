"""The loop around the DeepSpeed engine: setup, data, optimisation, checkpoints, metrics."""
