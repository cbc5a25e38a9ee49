"""Planning: per-GPU memory prediction, measured activations, FLOPs per iteration."""
