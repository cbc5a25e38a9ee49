"""Load networks from official EDM2 snapshots, the SiD/SiDA release's generator pickles and this project's
exports, and write exports.

    net = load_network("edm2-img512-xs-2147483-0.135.pkl")        # EDM2 teacher -> Precond, fp32, eval
    G = load_network("edm2_img512_xs_sid2a_alpha1-028674.pkl")     # SiDA generator -> Precond, no logvar head
    save_export(G, "exports/generator.safetensors")                # + exports/generator.json

    python -m sida_edm2.checkpoints convert edm2-img512-xs-2147483-0.135.pkl exports/edm2-xs.safetensors

Pickles are read with `sida_edm2.io.safe_unpickle` (nothing in them is executed): the architecture comes from
the constructor arguments `torch_utils.persistence` saved with the network (`_init_kwargs`), the weights
from its parameters and buffers. An export is `X.safetensors` (fp32 state dict) beside `X.json`:
{"format": "sida-edm2-export", "version": 1, "class": "Precond", "init_kwargs": {...}, "source": {...},
"export_id": ...}; the export_id is also stored in the safetensors metadata so that a weights file and a
config from different exports are never combined.
"""

import inspect
import json
import os
import pickle
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import safetensors.torch
import torch

from sida_edm2.io.safe_unpickle import PersistentObject, TorchModuleRecord, UnsafePickleError, load_pickle
from sida_edm2.model.networks import Block, Precond, UNet

EXPORT_FORMAT = "sida-edm2-export"
EXPORT_VERSION = 1
# The network inside a snapshot dict (EDM2 and the SiD/SiDA releases both save dict(ema=net, ...)).
PICKLE_NETWORK_KEY = "ema"
# Constructor switches of the SiDA release's networks that only steer its training code (no parameters).
RELEASE_TRAINING_KWARGS = ("force_normalization", "use_gan")
# Block/UNet arguments that the UNet itself sets for each block, never passed through Precond.
_SET_PER_BLOCK = set("self in_channels out_channels emb_channels flavor resample_mode attention".split())


# What --generator, --teacher and --init-generator accept, for error messages.
ACCEPTED_FORMATS = "an EDM2 or SiD/SiDA .pkl snapshot, or an export .safetensors with its .json"
# What reading a damaged or foreign file can raise anywhere in the parsers (random bytes, a truncated
# pickle or safetensors, a pickle of other objects); read_checkpoint turns it into a CheckpointError.
_PARSE_ERRORS = (
    OSError,
    EOFError,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    RuntimeError,
    safetensors.SafetensorError,
)


class CheckpointError(ValueError):
    """The file is not a network checkpoint this module can read, or does not match Precond."""


# Everything a CLI reports as "this file cannot be used" (one line, no traceback): the refusal of an
# unsafe pickle is an UnpicklingError of its own, kept apart so that callers can tell it from damage.
UNUSABLE_CHECKPOINT = (CheckpointError, UnsafePickleError)


@dataclass
class NetworkCheckpoint:
    """Everything needed to build a Precond, read from any supported file."""

    init_kwargs: dict  # Precond keyword arguments
    state_dict: dict[str, torch.Tensor]  # tensors in their saved dtype (fp16 in official pickles)
    source: dict = field(default_factory=dict)  # provenance: path, format, saved class name, VAE encoder
    path: str = ""  # the file read (what errors name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_checkpoint(path: str | Path) -> NetworkCheckpoint:
    """Read a `.pkl` snapshot or an export (`.safetensors` or its `.json`) without building the network.

    A missing, damaged or foreign file raises a one-line CheckpointError naming it and the accepted
    formats; a pickle that names a global outside the allowlist raises UnsafePickleError."""
    path = Path(path)
    if path.suffix not in (".pkl", ".safetensors", ".json"):
        raise CheckpointError(f"{path}: unknown checkpoint type; expected {ACCEPTED_FORMATS}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected {ACCEPTED_FORMATS}")
    try:
        checkpoint = _read_persistence_pickle(path) if path.suffix == ".pkl" else _read_export(path)
    except UnsafePickleError:
        raise
    except CheckpointError as err:  # readable, but not a network of a known layout
        message = _one_line(err) if str(path) in str(err) else f"{path}: {_one_line(err)}"
        raise CheckpointError(f"{message}; expected {ACCEPTED_FORMATS}") from err
    except _PARSE_ERRORS as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {_one_line(err)}); "
            f"expected {ACCEPTED_FORMATS}"
        ) from err
    checkpoint.path = str(path)
    return checkpoint


def state_shapes(state: dict) -> dict[str, tuple]:
    """Tensor name -> shape of a state dict."""
    return {name: tuple(t.shape) for name, t in state.items()}


def describe_mismatch(expected: dict, got: dict, limit: int = 5) -> str:
    """What differs between two `state_shapes` (missing and unexpected names, other shapes), briefly."""
    missing = sorted(set(expected) - set(got))[:limit]
    extra = sorted(set(got) - set(expected))[:limit]
    shapes = [
        f"{k}: {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]
    ]
    parts = [
        f"missing {missing}" if missing else "",
        f"unexpected {extra}" if extra else "",
        f"shape differences {shapes[:limit]}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p)


def build_network(checkpoint: NetworkCheckpoint, device: str | torch.device = "cpu") -> Precond:
    """Precond(**init_kwargs) with the checkpoint's weights loaded strictly, as float32, in eval mode and
    with requires_grad False."""
    kwargs = checkpoint.init_kwargs
    try:
        net = Precond(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{checkpoint.path}: cannot build Precond(**{kwargs}): {_one_line(err)}"
        ) from err
    try:
        # load_state_dict copies into the fp32 parameters, which converts fp16 weights.
        net.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as err:
        mismatch = describe_mismatch(state_shapes(net.state_dict()), state_shapes(checkpoint.state_dict))
        raise CheckpointError(
            f"{checkpoint.path}: its weights do not fit Precond(**{kwargs}) ({mismatch})"
        ) from err
    return net.float().to(device).eval().requires_grad_(False)


def load_network(path: str | Path, *, device: str | torch.device = "cpu") -> Precond:
    """A ready Precond (fp32, eval mode, requires_grad False) from an EDM2 `.pkl`, a SiD/SiDA generator
    `.pkl` or an export (`.safetensors` or `.json`)."""
    return build_network(read_checkpoint(path), device)


# --- persistence pickles ---------------------------------------------------------------------------------


def _read_persistence_pickle(path: Path) -> NetworkCheckpoint:
    data = load_pickle(path)
    if isinstance(data, dict):
        if PICKLE_NETWORK_KEY not in data:
            raise CheckpointError(f"{path}: no '{PICKLE_NETWORK_KEY}' entry (keys: {sorted(map(str, data))})")
        root = data[PICKLE_NETWORK_KEY]
    else:
        root = data
    if not isinstance(root, PersistentObject):
        raise CheckpointError(
            f"{path}: the network is a {type(root).__name__}, not a torch_utils.persistence object"
        )

    state_dict: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", state_dict)
    source = dict(
        path=str(path),
        format="torch_utils.persistence pickle",
        class_name=root.class_name,
        persistence_version=root.version,
    )
    encoder = data.get("encoder") if isinstance(data, dict) else None
    if isinstance(encoder, PersistentObject):
        source["encoder"] = _plain_attributes(encoder)
    init_kwargs = _precond_kwargs(root, has_logvar_head="logvar_linear.weight" in state_dict, path=path)
    return NetworkCheckpoint(init_kwargs=init_kwargs, state_dict=state_dict, source=source)


def _module_state(obj: object, name: str) -> dict:
    state = obj.state if isinstance(obj, PersistentObject | TorchModuleRecord) else None
    if not isinstance(state, dict) or not isinstance(state.get("_parameters"), dict):
        raise CheckpointError(f"'{name or '<root>'}' is a {type(obj).__name__}, not a saved torch module")
    return state


def _collect_tensors(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """The module's state dict, from the saved __dict__s: parameters, persistent buffers, then children."""
    state = _module_state(obj, prefix.rstrip("."))
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    tensors = list(state["_parameters"].items())
    tensors += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in non_persistent]
    for name, tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"'{prefix}{name}' is a {type(tensor).__name__}, not a tensor")
        out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def _accepted_kwargs() -> set[str]:
    """Keyword arguments that Precond passes down to UNet and Block, minus those UNet sets per block."""
    names = set()
    for cls in (Precond, UNet, Block):
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.add(param.name)
    return names - _SET_PER_BLOCK


def _precond_kwargs(root: PersistentObject, *, has_logvar_head: bool, path: Path) -> dict:
    """Map the saved constructor arguments of EDM2's Precond / the SiDA release's networks to Precond's."""
    init_args, init_kwargs = root.state.get("_init_args"), root.state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(
            f"{path}: the {root.class_name} has no saved constructor arguments (_init_kwargs)"
        )
    if init_args:
        # EDM2 and the releases construct networks with keyword arguments only.
        raise CheckpointError(f"{path}: positional constructor arguments {init_args!r} are not supported")
    kwargs = {k: v for k, v in init_kwargs.items() if k not in RELEASE_TRAINING_KWARGS}
    unknown = sorted(set(kwargs) - _accepted_kwargs())
    if unknown:
        raise CheckpointError(
            f"{path}: constructor argument(s) {unknown} of {root.class_name} are unknown to Precond"
        )
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kwargs]
    if missing:
        raise CheckpointError(f"{path}: the saved constructor arguments lack {missing}")
    if not has_logvar_head:
        # The release's generator class accepts logvar_channels but builds no head.
        kwargs["logvar_channels"] = 0
    return json.loads(json.dumps(kwargs))  # plain JSON types (tuples -> lists), as Precond.init_kwargs


def _plain_attributes(obj: PersistentObject) -> dict:
    """JSON-friendly public attributes of a persistent object, e.g. the VAE encoder's vae_name, scale
    and bias (EDM2 stores scale = final_std/raw_std and bias = final_mean - raw_mean*scale)."""
    out = {"class_name": obj.class_name}
    for key, value in obj.state.items():
        if isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "biuf":
            value = value.tolist()
        if not key.startswith("_") and _is_json_value(value):
            out[key] = value
    return out


def _is_json_value(value: object) -> bool:
    if isinstance(value, list | tuple):
        return all(_is_json_value(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


# --- exports ---------------------------------------------------------------------------------------------


def export_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights .safetensors, config .json) of an export named by either file or by its stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_export(net: Precond, path: str | Path, *, source: dict | None = None) -> tuple[Path, Path]:
    """Write `net` as an export: fp32 weights to X.safetensors and its config to X.json, each through a
    temporary file and os.replace. `source` (JSON-serialisable) records where the weights came from.
    Returns (weights path, config path)."""
    if not isinstance(net, Precond):
        raise TypeError(f"save_export expects a sida_edm2.model.networks.Precond, got {type(net).__name__}")
    weights_path, config_path = export_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    export_id = uuid.uuid4().hex
    tensors = {
        name: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()
        for name, t in net.state_dict().items()
    }
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "class": "Precond",
        "init_kwargs": net.init_kwargs,
        "source": source or {},
        "export_id": export_id,
    }
    metadata = {"format": EXPORT_FORMAT, "export_id": export_id}
    _atomic_write(weights_path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
    _atomic_write(config_path, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return weights_path, config_path


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        # Create the file first so that it gets the umask's permissions: safetensors writes mode 0600.
        tmp.touch()
        mode = tmp.stat().st_mode
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _read_export(path: Path) -> NetworkCheckpoint:
    weights_path, config_path = export_paths(path)
    for p in (weights_path, config_path):
        if not p.is_file():
            raise CheckpointError(f"{path}: export file {p} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not JSON ({err})") from err
    if (
        not isinstance(config, dict)
        or config.get("format") != EXPORT_FORMAT
        or config.get("version") != EXPORT_VERSION
    ):
        raise CheckpointError(f"{config_path}: not a {EXPORT_FORMAT} version {EXPORT_VERSION} config")
    if config.get("class") != "Precond":
        raise CheckpointError(f"{config_path}: unsupported class {config.get('class')!r}")
    with safetensors.safe_open(str(weights_path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("export_id") != config.get("export_id"):
        raise CheckpointError(f"{weights_path} and {config_path} belong to different exports")
    source = {**config.get("source", {}), "export": str(weights_path)}
    return NetworkCheckpoint(
        init_kwargs=config["init_kwargs"],
        state_dict=safetensors.torch.load_file(str(weights_path)),
        source=source,
    )


# --- command line ----------------------------------------------------------------------------------------


@click.group()
def main() -> None:
    """Network checkpoints: EDM2 snapshots (.pkl), SiD/SiDA generator pickles (.pkl) and exports
    (.safetensors + .json). Pickles are read without executing any code stored in them."""


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
def convert(src: Path, dst: Path) -> None:
    """Convert SRC (EDM2 .pkl, SiD/SiDA generator .pkl or an export) to the export DST
    (DST.safetensors + DST.json; DST may end in .safetensors).

    \b
    Example:
      python -m sida_edm2.checkpoints convert edm2-img512-xs-2147483-0.135.pkl exports/edm2-xs.safetensors
    """
    try:
        checkpoint = read_checkpoint(src)
        net = build_network(checkpoint)
    except UNUSABLE_CHECKPOINT as err:
        raise click.ClickException(str(err)) from err
    weights_path, config_path = save_export(net, dst, source=checkpoint.source)
    num_params = sum(p.numel() for p in net.parameters())
    click.echo(f"{src} ({checkpoint.source.get('class_name', 'export')}, {num_params:,} parameters)")
    click.echo(f"  -> {weights_path}\n  -> {config_path}")


if __name__ == "__main__":
    main()
