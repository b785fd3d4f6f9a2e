"""Training: the fit pipeline as stages, its two phases, learning rates, checkpoints, replicas."""
