"""Forced weight normalisation and the EMA on the flat fp32 master partitions of a DeepSpeed ZeRO-1/2
engine, inside its optimizer step: a few operations per parameter and one collective per step, instead
of gathering every parameter whole (sida_edm2.train.ds_master, which stays the path for ZeRO-0/3).

    flat = FlatMasters.attach(engine, normalize=True, ema=True)   # None where the engine has no flat
    flat.reset_ema()                                               # EMA := masters (after any init)
    flat.ema_beta = ema_beta(nimg, batch, ema_mimg)                # before each engine.step()
    engine.step()                                                  # ... Adam, rows, EMA, then bf16 copy
    flat.gather_ema(ema)                                           # collective: into a NetworkEMA

Under ZeRO-1/2, DeepSpeed hands its client optimizer (torch Adam) one flat fp32 tensor per parameter
group: this rank's partition of all master weights, each parameter a fragment of it
(`param._hp_mapping`). After the client's step DeepSpeed copies the partition into the working copy
(bf16/fp16) and all-gathers that. So the forced normalisation done right after the client's step
reaches the working copy without any copy of ours, and the EMA can be kept as a flat partition too,
gathered whole only when an export, grid or checkpoint needs it.

Rows of a weight may straddle two ranks' partitions: every rank computes the norms of its parts of
rows, one all-reduce adds their squares, and every rank scales its part. The hook also replaces
DeepSpeed's per-parameter gradient checks (ds_configs/zero2.json: check_grad_overflow and
compute_grad_norm false, ~8 small operations per parameter): one test of the flat gradient partition,
agreed on by all ranks, skips the whole step (Adam, normalisation, EMA) when any value is non-finite
and counts it in `skipped_steps`. fp16 keeps DeepSpeed's own check, which its loss scaling needs.
"""

import math

import torch

from sida_edm2.model.mp_layers import NORMALIZE_EPS
from sida_edm2.model.weight_norm import mp_weight_params
from sida_edm2.train.ds_master import update_masters_


class _RowFragment:
    """The part of one MPConv weight that lives in a flat partition, as whole rows to normalise."""

    def __init__(self, param: torch.nn.Parameter, row_offset: int):
        mapping = param._hp_mapping
        self.length = param[0].numel()  # row length (fan-in)
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        first, end = start // self.length, -(-(start + numel) // self.length)  # rows touched
        self.head = start - first * self.length  # elements of the first row held by other ranks
        self.fragment = mapping.hp_fragment
        self.rows = slice(row_offset + first, row_offset + end)
        self.aligned = self.head == 0 and numel % self.length == 0

    def padded(self) -> torch.Tensor:
        """[rows, length] view of the fragment; rows partly elsewhere are padded with zeros (a copy)."""
        if self.aligned:
            return self.fragment.view(-1, self.length)
        rows = self.rows.stop - self.rows.start
        full = self.fragment.new_zeros(rows * self.length)
        full[self.head : self.head + self.fragment.numel()] = self.fragment
        return full.view(rows, self.length)


class FlatMasters:
    """See the module docstring. Attach once per engine, after deepspeed.initialize."""

    def __init__(self, engine, normalize: bool, ema: bool):
        self.engine = engine
        self.normalize = normalize
        self.ema_enabled = ema
        self.ema_beta = 0.0  # set before each step that should move the EMA
        self.group = getattr(engine.optimizer, "dp_process_group", None)
        self.world_size = torch.distributed.get_world_size(self.group)
        client = engine.optimizer.optimizer
        self.partitions = [p for group in client.param_groups for p in group["params"]]
        self._index = {p.untyped_storage().data_ptr(): i for i, p in enumerate(self.partitions)}
        self.skipped_steps = 0
        self.ema_partitions: list[torch.Tensor] | None = None

        # Row norms of every MPConv weight, all partitions together: one all-reduce per step.
        mp_names = {name for name, _ in mp_weight_params(engine.module)}
        self.fragments: list[list[_RowFragment]] = [[] for _ in self.partitions]
        inv_sqrt_length, rows = [], 0
        for name, param in engine.module.named_parameters():
            if name in mp_names and param.requires_grad:
                if param._hp_mapping is not None:
                    self.fragments[self._part(param._hp_mapping.hp_fragment)].append(
                        _RowFragment(param, rows)
                    )
                inv_sqrt_length += [1 / math.sqrt(param[0].numel())] * param.shape[0]
                rows += param.shape[0]
        device = self.partitions[0].device
        self.row_norms = torch.zeros(rows, dtype=torch.float32, device=device)
        self.inv_sqrt_length = torch.tensor(inv_sqrt_length, dtype=torch.float32, device=device)
        self._client_step = client.step
        client.step = self._step

    @staticmethod
    def attach(engine, normalize: bool, ema: bool) -> "FlatMasters | None":
        """A FlatMasters for a ZeRO-1/2 engine (every trainable parameter mapped onto flat fp32
        partitions); None for other engines (stage 0, ZeRO-3), which keep sida_edm2.train.ds_master's path."""
        params = [p for p in engine.module.parameters() if p.requires_grad]
        if not params or not all(hasattr(p, "_hp_mapping") for p in params) or hasattr(params[0], "ds_id"):
            return None
        return FlatMasters(engine, normalize, ema)

    def _step(self, *args, **kwargs):
        # DeepSpeed steps one parameter group at a time: the client's param_groups are that group now.
        current = [p for group in self.engine.optimizer.optimizer.param_groups for p in group["params"]]
        bad = torch.zeros([], dtype=torch.float32, device=current[0].device)
        for part in current:
            if part.grad is not None:  # a NaN or inf anywhere makes the sum non-finite (no temporary)
                bad = bad.maximum(part.grad.sum().isfinite().logical_not_().float())
        if self.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if bad.item():  # one host sync per step (DeepSpeed's own check has one too)
            self.skipped_steps += 1
            return None
        result = self._client_step(*args, **kwargs)
        with torch.no_grad():
            if self.normalize:
                self._normalize_rows([self._part(p) for p in current])
            if self.ema_enabled and self.ema_partitions is not None:
                for part in current:
                    self.ema_partitions[self._part(part)].lerp_(part, 1 - self.ema_beta)
        return result

    def _normalize_rows(self, parts: list[int]) -> None:
        """w <- w / (1e-4 + ||w|| / sqrt(fan_in)) per row, for the rows of the given partitions."""
        frags = [frag for i in parts for frag in self.fragments[i]]
        padded = [frag.padded() for frag in frags]
        if self.world_size > 1:
            self.row_norms.zero_()  # rows with no part here count as zero in the sum below
        for frag, rows in zip(frags, padded, strict=True):
            torch.linalg.vector_norm(rows, dim=1, out=self.row_norms[frag.rows])
        if self.world_size > 1:  # squares of partial norms add up across ranks
            self.row_norms.square_()
            torch.distributed.all_reduce(self.row_norms, group=self.group)
            self.row_norms.sqrt_()
        divisor = torch.addcmul(
            torch.full_like(self.row_norms, NORMALIZE_EPS), self.row_norms, self.inv_sqrt_length
        )
        for frag, rows in zip(frags, padded, strict=True):
            rows.div_(divisor[frag.rows, None])
            if not frag.aligned:
                frag.fragment.copy_(rows.view(-1)[frag.head : frag.head + frag.fragment.numel()])

    def start(self, ema) -> None:
        """A start without checkpoint: normalised masters, EMA := masters (also into `ema`, a NetworkEMA
        on rank 0, None elsewhere). Collective."""
        update_masters_(self.engine, self.normalize, ema, self.ema_enabled, beta=0.0)
        if self.ema_enabled:
            self.reset_ema()

    def step(self, beta: float, ema=None) -> bool | None:
        """engine.step() with the EMA decay `beta` (normalisation and EMA happen inside it); at the
        accumulation boundary whether the step was skipped (None between boundaries). `ema` is only
        gathered on demand (gather_ema)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        skipped_before = self.engine.skipped_steps + self.skipped_steps
        self.ema_beta = beta
        self.engine.step()
        if not boundary:
            return None
        return self.engine.skipped_steps + self.skipped_steps != skipped_before

    def reset_ema(self) -> None:
        """EMA := the current master partitions (a start without checkpoint)."""
        self.ema_partitions = [p.detach().clone() for p in self.partitions]

    def _part(self, tensor: torch.Tensor) -> int:
        """Index of the flat partition that `tensor` (a partition or a view into one) lives in."""
        return self._index[tensor.untyped_storage().data_ptr()]

    def _trainable(self):
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _ema_fragment(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, slice] | None:
        """This rank's EMA of param's fragment and the fragment's slice of the flattened param (None
        where no part of param lives on this rank)."""
        mapping = param._hp_mapping
        if mapping is None:
            return None
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        part = self.ema_partitions[self._part(mapping.hp_fragment)]
        return part[hp.start : hp.start + hp.numel], slice(lp.start, lp.start + lp.numel)

    @torch.no_grad()
    def gather_ema(self, ema) -> None:
        """Collective: copy the flat EMA, whole, into `ema` (a NetworkEMA on rank 0; None elsewhere)."""
        for name, param in self._trainable():
            value = torch.zeros(param.numel(), dtype=torch.float32, device=self.partitions[0].device)
            fragment = self._ema_fragment(param)
            if fragment is not None:
                value[fragment[1]] = fragment[0]
            if self.world_size > 1:
                torch.distributed.all_reduce(value, group=self.group)
            if ema is not None:
                ema.update(name, value, beta=0.0)

    @torch.no_grad()
    def scatter_ema(self, ema) -> None:
        """Collective: the flat EMA from `ema` (a NetworkEMA on rank 0, None elsewhere), e.g. on resume."""
        self.reset_ema()
        device = self.partitions[0].device
        for name, param in self._trainable():
            value = torch.empty(param.numel(), dtype=torch.float32, device=device)
            if ema is not None:
                value.copy_(ema.module.get_parameter(name).reshape(-1))
            if self.world_size > 1:
                src = torch.distributed.get_global_rank(self.group, 0) if self.group is not None else 0
                torch.distributed.broadcast(value, src=src, group=self.group)
            fragment = self._ema_fragment(param)
            if fragment is not None:
                fragment[0].copy_(value[fragment[1]])
