"""Sampling: generators and teacher samplers, image files, seeds, FID / FD-DINOv2 metrics."""
