"""sida_edm2.io.network_files and sida_edm2.io.safe_unpickle: EDM2 / SiDA-release pickles written in the
torch_utils.persistence format (tests/helpers_checkpoints.py), exports, and refusal of malicious pickles.

    python -m pytest tests/test_checkpoints.py
"""

import collections
import copy
import json
import os
import pickle
import pickletools
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_checkpoints import MODULE_SRC, edm2_encoder, stand_in_modules, write_persistence_pickle

from sida_edm2.io.network_files import CheckpointError, load_network, main, read_checkpoint, save_export
from sida_edm2.io.safe_unpickle import PersistentObject, UnsafePickleError, load_pickle
from sida_edm2.model.mp_layers import MPConv
from sida_edm2.model.networks import Precond

TINY = dict(
    img_resolution=8,
    img_channels=4,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=16,
    dropout=0.0,
    logvar_channels=16,
)


def random_precond(**overrides) -> Precond:
    """A tiny Precond with every weight (gains included) random, so outputs depend on all of them."""
    torch.manual_seed(0)
    net = Precond(**{**TINY, **overrides})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net.eval()


def run(net: Precond, return_logvar: bool = True):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn([2, 4, 8, 8], generator=gen)
    labels = torch.eye(10)[[3, 7]]
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 2.0]), labels, return_logvar=return_logvar)
    return out if isinstance(out, tuple) else (out,)


def assert_state_equal(net: torch.nn.Module, reference: torch.nn.Module) -> None:
    state, ref = net.state_dict(), reference.state_dict()
    assert list(state) == list(ref)
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, ref[name].float()), name


@pytest.fixture(scope="module")
def teacher() -> dict:
    """An fp32 network, its fp16 copy (what official files hold) and that copy rounded back to fp32."""
    net = random_precond()
    half = copy.deepcopy(net).half()
    return dict(fp32=net, fp16=half, rounded=copy.deepcopy(half).float())


@pytest.fixture(scope="module")
def edm2_pkl(teacher, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("edm2") / "edm2-img512-tiny-0000001-0.100.pkl"
    write_persistence_pickle(path, teacher["fp16"], {**TINY, "use_fp16": True})
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_edm2_snapshot_loads_as_fp32_precond(teacher, tmp_path, protocol):
    path = tmp_path / "snapshot.pkl"
    write_persistence_pickle(path, teacher["fp16"], {**TINY, "use_fp16": True}, protocol=protocol)
    net = load_network(path)

    assert type(net) is Precond and not net.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    assert net.init_kwargs == {**teacher["fp32"].init_kwargs, "use_fp16": True}
    assert_state_equal(net, teacher["rounded"])
    for out, ref, exact in zip(run(net), run(teacher["fp32"]), run(teacher["rounded"]), strict=True):
        assert torch.equal(out, exact)
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)  # fp16 rounding of the weights only


def test_read_checkpoint_keeps_saved_dtype_and_reports_encoder(edm2_pkl):
    checkpoint = read_checkpoint(edm2_pkl)
    assert {t.dtype for t in checkpoint.state_dict.values()} == {torch.float16}
    assert checkpoint.source["class_name"] == "Precond" and checkpoint.source["persistence_version"] == 6
    encoder = edm2_encoder().state
    assert checkpoint.source["encoder"] == dict(
        class_name="StabilityVAEEncoder",
        vae_name=encoder["vae_name"],
        scale=encoder["scale"].tolist(),
        bias=encoder["bias"].tolist(),
        batch_size=8,
    )


def test_sida_generator_pickle_without_logvar_head(tmp_path):
    generator = random_precond(logvar_channels=0)
    half = copy.deepcopy(generator).half()
    # The release's generator class takes SiDA switches and logvar_channels, but builds no logvar head.
    saved_kwargs = {
        **TINY,
        "use_fp16": True,
        "force_normalization": True,
        "use_gan": True,
        "logvar_channels": 128,
    }
    path = tmp_path / "edm2_img512_tiny_sid2a_alpha1-000001.pkl"
    write_persistence_pickle(
        path,
        half,
        saved_kwargs,
        official_layout=False,
        class_names={half: "EDM_2_Precond_Generator", half.unet: "UNet_EncoderDecoder"},
    )
    net = load_network(path)

    assert net.logvar_linear is None and net.init_kwargs["logvar_channels"] == 0
    assert "force_normalization" not in net.init_kwargs and "use_gan" not in net.init_kwargs
    assert read_checkpoint(path).source["class_name"] == "EDM_2_Precond_Generator"
    rounded = copy.deepcopy(half).float()
    assert_state_equal(net, rounded)
    assert torch.equal(run(net, return_logvar=False)[0], run(rounded, return_logvar=False)[0])


def test_unknown_constructor_argument_is_refused(teacher, tmp_path):
    path = tmp_path / "snapshot.pkl"
    write_persistence_pickle(path, teacher["fp16"], {**TINY, "fancy_new_option": 1})
    with pytest.raises(CheckpointError, match="fancy_new_option"):
        load_network(path)


def test_weights_that_do_not_fit_the_saved_arguments_are_refused(teacher, tmp_path):
    path = tmp_path / "snapshot.pkl"
    write_persistence_pickle(path, teacher["fp16"], {**TINY, "model_channels": 32})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_network(path)


def test_convert_cli_writes_an_export_that_loads(teacher, edm2_pkl, tmp_path):
    dst = tmp_path / "exports" / "teacher.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "sida_edm2.checkpoints", "convert", str(edm2_pkl), str(dst)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dst.parent.iterdir()) == ["teacher.json", "teacher.safetensors"]

    config = json.loads(dst.with_suffix(".json").read_text())
    assert (config["format"], config["version"], config["class"]) == ("sida-edm2-export", 1, "Precond")
    assert config["source"]["path"] == str(edm2_pkl) and config["source"]["encoder"]["vae_name"]
    for path in (dst, dst.with_suffix(".json")):
        net = load_network(path)
        assert_state_equal(net, teacher["rounded"])
        assert all(torch.equal(a, b) for a, b in zip(run(net), run(teacher["rounded"]), strict=True))


def test_save_export_round_trip_and_mismatched_pair(tmp_path):
    net = random_precond(logvar_channels=0)
    weights, config = save_export(net, tmp_path / "generator")
    assert (weights.name, config.name) == ("generator.safetensors", "generator.json")
    assert weights.stat().st_mode == config.stat().st_mode  # the umask's, not safetensors' 0600
    loaded = load_network(weights)
    assert_state_equal(loaded, net)
    assert torch.equal(run(loaded, return_logvar=False)[0], run(net, return_logvar=False)[0])

    # A config from another export next to these weights (e.g. a crash between the two renames).
    _, other_config = save_export(net, tmp_path / "other")
    os.replace(other_config, config)
    with pytest.raises(CheckpointError, match="different exports"):
        load_network(weights)


def test_cli_help_and_errors(tmp_path):
    result = CliRunner().invoke(main, ["convert", "--help"])
    assert result.exit_code == 0 and "SRC" in result.output and ".safetensors" in result.output
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"ema": 1}))
    result = CliRunner().invoke(main, ["convert", str(bad), str(tmp_path / "out")])
    assert result.exit_code == 1 and "not a torch_utils.persistence object" in result.output


def _normalize_weight_hook(module, args):
    """Stands in for the release's MPConv pre-hook; only its name and binding reach the pickle."""
    raise AssertionError("a hook stored in a test pickle was called")


def _with_bound_pre_hooks(net: torch.nn.Module) -> int:
    """Register on every MPConv a forward pre-hook bound to that MPConv, as the SiDA release does with
    forced normalisation; a bound method pickles as GLOBAL builtins.getattr + (module, 'name') + REDUCE."""
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    for conv in convs:
        conv.register_forward_pre_hook(types.MethodType(_normalize_weight_hook, conv))
    return len(convs)


def _dropped_hooks(record: PersistentObject) -> collections.Counter:
    """Names of the DroppedHook markers in the forward pre-hooks of `record` and its submodules."""
    found = collections.Counter(h.name for h in record.state["_forward_pre_hooks"].values())
    for child in record.state["_modules"].values():
        found.update(_dropped_hooks(child))
    return found


def _reduced_globals(data: bytes) -> list[str]:
    """'module.name' of every global that the pickle calls (GLOBAL or STACK_GLOBAL)."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]))
    return found


@pytest.mark.parametrize("protocol", [2, 4])
def test_sida_snapshot_with_bound_pre_hooks_loads_and_drops_them(tmp_path, protocol):
    generator = random_precond(logvar_channels=0)
    half = copy.deepcopy(generator).half()
    rounded = copy.deepcopy(half).float()  # the reference, without hooks
    hooks = _with_bound_pre_hooks(half)
    path = tmp_path / "edm2_img512_tiny_sid2a_alpha1-000001.pkl"
    kwargs = {**TINY, "use_fp16": True, "force_normalization": True, "use_gan": True}
    write_persistence_pickle(path, half, kwargs, official_layout=False, protocol=protocol)
    getattr_name = "__builtin__.getattr" if protocol == 2 else "builtins.getattr"
    assert getattr_name in _reduced_globals(path.read_bytes())
    assert _dropped_hooks(load_pickle(path)["ema"]) == {"_normalize_weight_hook": hooks} and hooks > 0

    net = load_network(path)  # the hook, were it called, would raise
    assert not any(m._forward_pre_hooks for m in net.modules())
    assert_state_equal(net, rounded)
    assert torch.equal(run(net, return_logvar=False)[0], run(rounded, return_logvar=False)[0])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_values_survive_the_restricted_unpickler(tmp_path, protocol):
    values = dict(
        half=torch.randn([3, 2]).half().t(),  # non-contiguous view
        param=torch.nn.Parameter(torch.randn([2])),
        array=np.float32([1, 2]) / np.float32(3),
        scalar=np.float32(2.5),
        dtype=torch.bfloat16,
        sets=({1, 2}, frozenset([3])),
        ordered=collections.OrderedDict(a=b"\x00\xff"),
    )
    path = tmp_path / "values.pkl"
    path.write_bytes(pickle.dumps(values, protocol=protocol))
    loaded = load_pickle(path)
    assert torch.equal(loaded.pop("half"), values.pop("half")) and torch.equal(
        loaded.pop("param"), values.pop("param")
    )
    assert np.array_equal(loaded.pop("array"), values.pop("array")) and loaded == values


# --- malicious pickles -----------------------------------------------------------------------------------


class Call:
    """Pickles as the call fn(*args): what a malicious file contains."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch_payloads(sentinel: Path) -> dict[str, bytes]:
    """Pickles that create `sentinel` when unpickled normally, keyed by the global they name."""
    touch = f"touch {sentinel}"
    return {
        "os.system": b"cos\nsystem\n(V" + touch.encode() + b"\ntR.",  # hand-written protocol-0 opcodes
        "builtins.eval": pickle.dumps(Call(eval, f"open({str(sentinel)!r}, 'w').close()")),
        "subprocess.Popen": pickle.dumps(Call(subprocess.Popen, ["touch", str(sentinel)])),
        # A tensor storage whose embedded torch.save stream is itself a malicious pickle (protocol 2, as
        # torch.save writes: torch's weights-only unpickler then names the global it refuses).
        f"{os.system.__module__}.system": pickle.dumps(
            Call(torch.storage._load_from_bytes, pickle.dumps(Call(os.system, touch), protocol=2))
        ),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "storage"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, name):
    sentinel = tmp_path / "pwned"
    payloads = _touch_payloads(sentinel)
    key = f"{os.system.__module__}.system" if name == "storage" else name
    path = tmp_path / "evil.pkl"
    path.write_bytes(payloads[key])
    with pytest.raises(UnsafePickleError, match=re.escape(key)):
        load_network(path)
    assert not sentinel.exists()

    # Control: the same bytes do create the file under a plain pickle.load.
    try:
        result = pickle.loads(payloads[key])
        if isinstance(result, subprocess.Popen):
            result.wait()
    except RuntimeError:  # the storage payload runs, then fails torch.load's magic-number check
        pass
    assert sentinel.exists()


def test_payload_nested_in_a_valid_snapshot_is_refused(teacher, tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "snapshot.pkl"
    write_persistence_pickle(
        path, teacher["fp16"], {**TINY, "model_channels": Call(os.system, f"touch {sentinel}")}
    )
    with pytest.raises(UnsafePickleError, match=f"'{os.system.__module__}.system'"):
        load_network(path)
    assert not sentinel.exists()


def test_module_src_is_never_executed(teacher, tmp_path):
    sentinel = tmp_path / "pwned"
    module_src = f"open({str(sentinel)!r}, 'w').write('executed')\n"
    path = tmp_path / "snapshot.pkl"
    write_persistence_pickle(path, teacher["fp16"], {**TINY, "use_fp16": True}, module_src=module_src)
    assert module_src.encode() in path.read_bytes() and MODULE_SRC.encode() not in path.read_bytes()
    assert_state_equal(load_network(path), teacher["rounded"])
    assert not sentinel.exists()


class _Record:
    """Pickles as a torch_utils.persistence record (a saved module) without any real module."""

    def __reduce__(self):
        reconstruct = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name="MPConv", state={})
        return reconstruct, (meta,)


def _getattr_payloads(sentinel: Path) -> dict[str, object]:
    """Objects whose pickles use getattr in a shape other than (saved module, literal name)."""
    return {
        # getattr on a plain value, i.e. a way to reach arbitrary attributes of allowed globals.
        "str": Call(getattr, "x", "join"),
        "ordered-dict": Call(getattr, collections.OrderedDict(), "update"),
        "dotted-name": Call(getattr, _Record(), "state.update"),
        "non-string-name": Call(getattr, _Record(), b"state"),
        "default-argument": Call(getattr, _Record(), "missing", f"touch {sentinel}"),
        # getattr's result called (the bytes get the call appended: a marker pickles as no callable).
        "called": Call(getattr, _Record(), "forward"),
    }


@pytest.mark.parametrize("shape", list(_getattr_payloads(Path("x"))))
def test_getattr_in_any_other_shape_is_refused(tmp_path, shape):
    sentinel = tmp_path / "pwned"
    with stand_in_modules():
        data = pickle.dumps(_getattr_payloads(sentinel)[shape], protocol=2)  # no frames: appendable
    if shape == "called":
        data = data.removesuffix(pickle.STOP) + b"(V" + f"touch {sentinel}".encode() + b"\ntR."
    assert "__builtin__.getattr" in _reduced_globals(data)
    pickle_path = tmp_path / "evil.pkl"
    pickle_path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"getattr|dropped hook"):
        load_pickle(pickle_path)
    assert not sentinel.exists()
