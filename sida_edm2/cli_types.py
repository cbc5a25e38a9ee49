"""click parameter types shared by the command lines (encode_dataset.py, decode_samples.py)."""

import click
import torch


class DeviceType(click.ParamType):
    """A torch device name (cpu, cuda, cuda:1, ...), kept as text; "auto" too when allowed. A name torch
    does not know, or a CUDA device this machine does not have, is a usage error."""

    name = "device"

    def __init__(self, allow_auto: bool):
        self.allow_auto = allow_auto  # accept "auto" (the CLI picks cuda when there is one)

    def convert(self, value, param, ctx) -> str:
        if self.allow_auto and value == "auto":
            return value
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a device (cpu, cuda, cuda:1, ...)", param, ctx)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            self.fail(f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)", param, ctx)
        return value
