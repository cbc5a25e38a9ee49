"""Exponential moving average of the generator (or of the network method "edm2" trains), kept in fp32
from the optimizer's fp32 master weights.

    ema = NetworkEMA(G, device)                             # fp32 copy of G's architecture (rank 0 only)
    for name, value in visit_master_weights(engine_g, normalize=cfg.force_norm):
        ema.update(name, value, beta=ema_beta(nimg, batch, ema_mimg))

The EMA is what the run exports and what sample grids show. Under ZeRO-0/3 this copy is the EMA itself,
on rank 0's GPU, updated from the gathered masters after every step. Under ZeRO-1/2 the EMA is kept as
flat partitions beside the masters (sida_edm2.train.flat_master) and this copy, in host memory, is only where
it is gathered for checkpoints, exports and grids (Trainer.ema_network()).
"""

import copy
from collections.abc import Iterable

import torch


def ema_beta(nimg: int, batch: int, ema_mimg: float = 2.0, rampup: float | None = 0.05) -> float:
    """EMA decay for one step of `batch` images taken at `nimg` images seen (before the step).

    halflife = min(ema_mimg*1e6, rampup*nimg) (rampup None: no ramp-up); beta = 0.5 ** (batch / halflife),
    with the halflife floored at 1e-8 so that nimg = 0 gives beta = 0 (the EMA copies the weights).
    """
    halflife = ema_mimg * 1e6
    if rampup is not None:
        halflife = min(halflife, rampup * nimg)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def ema_update_(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], beta: float) -> None:
    """In place: ema <- beta*ema + (1-beta)*param for each pair (param cast to the EMA's dtype)."""
    ema_list, param_list = list(ema_params), list(params)
    if len(ema_list) != len(param_list):
        raise ValueError(f"{len(ema_list)} EMA tensors vs {len(param_list)} parameters")
    for ema, p in zip(ema_list, param_list, strict=True):
        ema.lerp_(p.detach().to(ema.dtype), 1.0 - beta)


class NetworkEMA:
    """An fp32, eval-mode, gradient-free copy of a network whose parameters track its master weights."""

    def __init__(
        self,
        net: torch.nn.Module,  # Plain (not yet DeepSpeed-wrapped) network; its current weights start the EMA.
        device: torch.device,  # Where the EMA lives (the rank's GPU, or the CPU).
    ):
        self.module = copy.deepcopy(net).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.module.compute_dtype = torch.float32
        self._params = dict(self.module.named_parameters())

    @torch.no_grad()
    def update(self, name: str, value: torch.Tensor, beta: float) -> None:
        """ema <- beta * ema + (1 - beta) * value for the parameter `name` (beta 0 copies the value
        exactly: lerp with weight 1 returns its end point). `value` may have shape [1] where the EMA's
        parameter is 0-d (see engines.scalar_params_to_1d_)."""
        ema = self._params[name]
        ema_update_([ema], [value.reshape(ema.shape).to(ema.device)], beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu() for name, tensor in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
