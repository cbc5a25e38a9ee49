"""Read NVIDIA `torch_utils.persistence` pickles (EDM2 snapshots, the SiD/SiDA releases) without running
any code they carry.

Such a file is an ordinary pickle in which every object of a "persistent" class (Precond, UNet, Block,
MPConv, MPFourier, the VAE encoder, the loss) is saved as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where
`meta = dict(type='class', version=6, module_src=<source text of the defining module>, class_name=...,
state=<the object's __dict__>)`. Unpickling it the normal way `exec`s `module_src`. Here that call instead
returns a `PersistentObject` that only records the class name and the state; `module_src` is dropped
unread. Tensors are rebuilt from their storages, each of which is itself a small legacy `torch.save`
stream that is opened with `torch.load(weights_only=True)`.

Runs of the SiDA release with forced normalisation store each MPConv's forward pre-hook, a bound method,
which pickles as `builtins.getattr(<that module>, '<method name>')`. That one shape is accepted: getattr
applied to a persistence record or torch-module placeholder with a literal string name gives a
`DroppedHook` marker (nothing is looked up or called); the loader never reads the hooks.

Every global the pickle names is looked up in a fixed table (`find_class`); anything else, e.g.
`os.system`, stops the load with `UnsafePickleError` before it can be called:

    data = load_pickle("edm2-img512-xs-2147483-0.135.pkl")
    data["ema"]                      # PersistentObject(class_name='Precond', state={...})
"""

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something outside the allowlist (it could run code); nothing was run."""


@dataclass
class PersistentObject:
    """A persistent-class object as saved: its class name and __dict__, without the class itself."""

    class_name: str
    version: int  # torch_utils.persistence's format version (6 for EDM2)
    state: dict


class TorchModuleRecord:
    """A plain torch.nn container (ModuleDict, ModuleList, ...) as saved: its class name and __dict__.

    The pickle creates it with NEWOBJ (no __init__) and then hands it its state (BUILD -> __setstate__).
    """

    class_name = "Module"
    state: dict | None = None

    def __setstate__(self, state: dict) -> None:
        self.state = state


@dataclass(frozen=True)
class DroppedHook:
    """What `getattr(module, name)` stood for in the pickle (a hook bound to that module): a marker only."""

    owner: str  # class name of the module the method was bound to
    name: str

    def __call__(self, *args: Any) -> None:
        raise UnsafePickleError(f"refusing to call the dropped hook {self.owner}.{self.name}")


def _hook_getattr(*args: Any) -> DroppedHook:
    """`getattr(record, 'name')` as a bound forward hook pickles; any other use of getattr is refused."""
    if len(args) == 2:
        owner, name = args
        is_module = isinstance(owner, PersistentObject | TorchModuleRecord)
        # type() is str: a str subclass could only come from another reduce call, never from a literal.
        if is_module and type(name) is str and name.isidentifier():
            return DroppedHook(owner=owner.class_name, name=name)
    shape = ", ".join(type(a).__name__ for a in args)
    raise UnsafePickleError(
        f"refusing builtins.getattr({shape}): only getattr(<saved module>, '<method name>') is allowed"
    )


def _torch_module_record(name: str) -> type:
    return type(f"{name}Record", (TorchModuleRecord,), {"class_name": name})


class AttrDict(dict):
    """Stands in for `dnnlib.util.EasyDict` (a dict subclass), the top level of EDM2 snapshot pickles."""


def _reconstruct_persistent_obj(meta: dict) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError(f"unsupported torch_utils.persistence record: {type(meta).__name__}")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("torch_utils.persistence record without class_name/state")
    return PersistentObject(class_name=class_name, version=meta.get("version"), state=state)


def _load_storage_bytes(data: bytes) -> torch.storage.TypedStorage:
    """torch.storage._load_from_bytes, but through torch's weights-only unpickler."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("tensor storage payload is not bytes")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise UnsafePickleError(f"refusing a tensor storage payload that is not plain data: {err}") from err
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"tensor storage payload holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 without hooks: a view of an already loaded storage."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"tensor built from a {type(storage).__name__} instead of a storage")
    if backward_hooks:
        raise UnsafePickleError("refusing a tensor with backward hooks")
    # requires_grad and metadata (conj/neg bits, unused by float weights) are dropped: the loader
    # returns frozen networks.
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter built from a {type(data).__name__} instead of a tensor")
    if backward_hooks:
        raise UnsafePickleError("refusing a parameter with backward hooks")
    return data


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# numpy's own reconstructors (array from shape+dtype+raw bytes, scalar from dtype+raw bytes) only ever
# build numpy values; they receive objects this unpickler already vetted.
_NP_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (Python >= 3.14 default): array from a buffer

_TORCH_DTYPE_NAMES = (
    "float16 half float32 float float64 double bfloat16 uint8 int8 int16 int32 int64 bool".split()
)
_TORCH_CONTAINERS = ("ModuleDict", "ModuleList")

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): AttrDict,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.modules.linear", "Identity"): _torch_module_record("Identity"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "getattr"): _hook_getattr,
    ("__builtin__", "getattr"): _hook_getattr,  # protocol-2 spelling
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): getattr(torch, name) for name in _TORCH_DTYPE_NAMES},
    **{("torch.nn.modules.container", name): _torch_module_record(name) for name in _TORCH_CONTAINERS},
    **{
        (module, "_reconstruct"): _NP_RECONSTRUCT
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(module, "scalar"): _NP_SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _NP_FROMBUFFER for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come only from `_ALLOWED_GLOBALS`."""

    def __init__(self, file: BinaryIO, source: str = "<stream>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}' from {self.source}: only tensors, plain "
                "containers and torch_utils.persistence records are allowed (the file was not executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r} in {self.source}")


def load_pickle(path: str | Path) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`: persistent objects come back as `PersistentObject`,
    torch containers as `TorchModuleRecord`, tensors as plain CPU tensors in their saved dtype."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=str(path)).load()
