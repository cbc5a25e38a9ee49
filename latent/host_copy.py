"""GPU results copied to the host without stalling the GPU: start the copy now, wait for it later.

    copy = HostCopy([mean, std])      # queued after the kernels that produce them; returns at once
    ...                               # queue the next batch's kernels here
    mean_np, std_np = copy.wait()     # waits for this copy only, not for the work queued since

Waiting with `.cpu()` instead would drain the whole stream, so the GPU would idle while the host turns
one batch's results into files and fetches the next batch.
"""

from collections.abc import Sequence

import numpy as np
import torch


class HostCopy:
    def __init__(self, tensors: Sequence[torch.Tensor]):
        self._event = None
        if tensors and tensors[0].is_cuda:
            # Pinned buffers: only they make a non_blocking device-to-host copy asynchronous.
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, tensor in zip(self._host, tensors, strict=True):
                host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = [t.detach().cpu() for t in tensors]

    def wait(self) -> list[np.ndarray]:
        """The tensors as numpy arrays in ordinary memory (the pinned buffers go back to torch's cache)."""
        if self._event is not None:
            self._event.synchronize()
            return [h.numpy().copy() for h in self._host]
        return [h.numpy() for h in self._host]
