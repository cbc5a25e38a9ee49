"""Shared pytest settings: CPU only, deterministic, DeepSpeed told to use the CPU accelerator."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
