"""Test-only writer of NVIDIA `torch_utils.persistence` pickles, built from the format's description (no
NVIDIA code): every persistent object is saved as the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = dict(type='class', version=6, module_src=<module source text>, class_name=..., state=obj.__dict__)`,
and EDM2 snapshots are a `dnnlib.util.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=net)`.

To let `pickle` write those GLOBALs, throwaway modules named `torch_utils.persistence` and `dnnlib.util`
exist in sys.modules only while a file is written; the loader under test never sees them.
"""

import contextlib
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# What persistence stores as module_src; the loader must never run it.
MODULE_SRC = "raise RuntimeError('module_src of a test pickle was executed')\n"


@dataclass
class Persistent:
    """A persistent object that is not a torch module (EDM2's VAE encoder, its loss function)."""

    class_name: str
    state: dict


def edm2_encoder() -> Persistent:
    """EDM2's StabilityVAEEncoder as saved: scale/bias are float32 numpy arrays, the VAE itself is None."""
    raw_mean, raw_std = np.float32([5.81, 3.25, 0.12, -2.15]), np.float32([4.17, 4.62, 3.71, 3.28])
    scale = np.float32(0.5) / raw_std
    state = dict(
        vae_name="stabilityai/sd-vae-ft-mse",
        scale=scale,
        bias=np.float32(0) - raw_mean * scale,
        batch_size=8,
        _vae=None,
        _init_args=(),
        _init_kwargs={},
    )
    return Persistent("StabilityVAEEncoder", state)


@contextlib.contextmanager
def stand_in_modules():
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("stand-in, never called")

    class EasyDict(dict):
        pass

    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = EasyDict
    modules = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    assert not set(modules) & set(sys.modules)
    sys.modules.update(modules)
    try:
        yield _reconstruct_persistent_obj, EasyDict
    finally:
        for name in modules:
            del sys.modules[name]


class _PersistencePickler(pickle.Pickler):
    def __init__(self, file, protocol, reconstruct, module_src, class_names, root_kwargs):
        super().__init__(file, protocol=protocol)
        self.reconstruct, self.module_src = reconstruct, module_src
        self.class_names, self.root_kwargs = class_names, root_kwargs

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            return self._persistent(obj.class_name, obj.state)
        # EDM2's own classes are persistent; torch's containers (enc/dec ModuleDicts) pickle normally.
        if isinstance(obj, torch.nn.Module) and not isinstance(
            obj, torch.nn.ModuleDict | torch.nn.ModuleList
        ):
            state = {**obj.__dict__, "_init_args": (), "_init_kwargs": self.root_kwargs.get(id(obj), {})}
            return self._persistent(self.class_names.get(id(obj), type(obj).__name__), state)
        return NotImplemented

    def _persistent(self, class_name, state):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        return self.reconstruct, (meta,)


def write_persistence_pickle(
    path: Path,
    net: torch.nn.Module,
    init_kwargs: dict,
    *,
    official_layout: bool = True,
    class_names: dict[torch.nn.Module, str] | None = None,
    protocol: int = 4,
    module_src: str = MODULE_SRC,
) -> None:
    """Save `net` (whose constructor arguments were `init_kwargs`) like EDM2's training loop does
    (`official_layout`: EasyDict with encoder, dataset_kwargs, loss_fn, ema) or like the SiD/SiDA
    release (a plain dict(ema=net)). `class_names` renames classes, e.g. to the release's."""
    names = {id(module): name for module, name in (class_names or {}).items()}
    with stand_in_modules() as (reconstruct, EasyDict):
        if official_layout:
            loss_fn = Persistent(
                "EDM2Loss",
                dict(
                    P_mean=-0.4,
                    P_std=1.0,
                    sigma_data=0.5,
                    _init_args=(),
                    _init_kwargs=dict(P_mean=-0.4, P_std=1.0),
                ),
            )
            dataset_kwargs = EasyDict(
                class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip", use_labels=True
            )
            data = EasyDict(encoder=edm2_encoder(), dataset_kwargs=dataset_kwargs, loss_fn=loss_fn, ema=net)
        else:
            data = dict(ema=net)
        with open(path, "wb") as f:
            _PersistencePickler(f, protocol, reconstruct, module_src, names, {id(net): init_kwargs}).dump(
                data
            )
