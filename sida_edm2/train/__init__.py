"""Training: the Trainer, losses, EMA, configuration, data, logging, run checkpoints, DeepSpeed plumbing."""
