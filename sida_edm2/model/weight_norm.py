"""Forced weight normalisation (EDM2; SiDA paper Appendix B.2; DESIGN.md 3.2).

EDM2 rescales every stored MPConv weight row to RMS 1 in place inside forward. That breaks SiDA, whose
fake score runs twice (real and fake inputs) before one backward: the second in-place copy invalidates
tensors the first forward saved for backward. Here the rescaling happens outside forward, at most once
per optimizer step:

    fwn = ForcedWeightNorm(net)        # pre-forward hook: normalise before the first training forward
    for batch in data:                 #   after construction and after each fwn.step()
        loss = f(net(real)) + f(net(fake))
        loss.backward(); opt.step(); opt.zero_grad()
        fwn.step()

Under DeepSpeed the training code calls `normalize_rows_` on the fp32 master weights of the
parameters listed by `mp_weight_params` instead.
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


class ForcedWeightNorm:
    """A forward pre-hook on `module` that applies force_normalize_ once before the first training-mode
    forward after construction and after each `step()`; eval-mode forwards never normalise, and
    forwards between two steps (e.g. several passes sharing one backward) see the same weights.
    Set `enabled = False` to switch it off (then `step()` only counts)."""

    def __init__(
        self,
        module: torch.nn.Module,  # The network whose MPConv weights are normalised.
        enabled: bool = True,  # Whether the hook normalises at all.
    ):
        self.module = module
        self.enabled = enabled
        self.num_steps = 0  # optimizer steps reported through step()
        self.normalized_at_step: int | None = None  # num_steps at the last normalisation
        self.num_normalizations = 0
        self._handle = module.register_forward_pre_hook(self._pre_forward)

    def step(self) -> None:
        """Call after each optimizer step: the next training-mode forward normalises again."""
        self.num_steps += 1

    def remove(self) -> None:
        """Detach the hook from the module."""
        self._handle.remove()

    def _pre_forward(self, module: torch.nn.Module, args) -> None:
        if not (self.enabled and module.training) or self.normalized_at_step == self.num_steps:
            return
        force_normalize_(module)
        self.normalized_at_step = self.num_steps
        self.num_normalizations += 1
