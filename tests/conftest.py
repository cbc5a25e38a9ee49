"""Shared pytest settings: CPU only, deterministic, DeepSpeed told to use the CPU accelerator."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # after OMP_NUM_THREADS, which torch reads when it is imported

# Triton reads this when it is first imported, whichever test imports it first: on a machine without a
# GPU, tests/test_fused.py runs the fused kernels in Triton's interpreter. Training never uses them there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
