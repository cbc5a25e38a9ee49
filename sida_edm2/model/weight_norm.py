"""Forced weight normalisation (EDM2; SiDA paper Appendix B.2; docs/ARCHITECTURE.md, "Known traps").

EDM2 rescales every stored MPConv weight row to RMS 1 in place inside forward. That breaks SiDA, whose
fake score runs twice (real and fake inputs) before one backward: the second in-place copy invalidates
tensors the first forward saved for backward. Here the rescaling happens outside forward, once per
optimizer step: the training calls `normalize_rows_` on the fp32 master weights of the parameters listed
by `mp_weight_params` (sida_edm2.train.ds_master, sida_edm2.train.flat_master); `force_normalize_`
does it on a plain module.
"""

import torch

from sida_edm2.model.mp_layers import MPConv, normalize


def mp_weight_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(qualified name, parameter) of every MPConv weight in module: the tensors forced weight
    normalisation touches (gains and Fourier buffers are excluded)."""
    return [
        (f"{name}.weight" if name else "weight", sub.weight)
        for name, sub in module.named_modules()
        if isinstance(sub, MPConv)
    ]


@torch.no_grad()
def normalize_rows_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: each output row w <- w / (1e-4 + ||w|| / sqrt(fan_in)), computed in float32 whatever
    the tensor's dtype. Returns the tensor."""
    tensor.copy_(normalize(tensor.to(torch.float32)))
    return tensor


@torch.no_grad()
def force_normalize_(module: torch.nn.Module) -> None:
    """normalize_rows_ on every MPConv weight of a plain (non-DeepSpeed) module."""
    for _, param in mp_weight_params(module):
        normalize_rows_(param)
