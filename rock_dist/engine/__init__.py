"""Training loop, checkpoints, evaluation, console and TensorBoard logging."""
