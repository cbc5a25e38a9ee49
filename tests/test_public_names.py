"""The documented names from before the subpackages (sida_edm2.presets, .networks, .checkpoints, .flops,
.metrics) still import and run as commands, as the same module objects as their new homes."""

import subprocess
import sys

import pytest

import sida_edm2


@pytest.mark.parametrize(("alias", "target"), sorted(sida_edm2.PUBLIC_ALIASES.items()))
def test_alias_is_the_target_module(alias: str, target: str) -> None:
    __import__(alias)
    __import__(target)
    assert sys.modules[alias] is sys.modules[target]


def test_documented_imports() -> None:
    from sida_edm2.checkpoints import load_network
    from sida_edm2.networks import Precond
    from sida_edm2.presets import PRESETS

    from sida_edm2.io.network_files import load_network as home_load_network
    from sida_edm2.model.networks import Precond as HomePrecond

    assert Precond is HomePrecond and load_network is home_load_network and "edm2-img512-xs" in PRESETS


def test_module_command_names_itself() -> None:
    out = subprocess.run([sys.executable, "-m", "sida_edm2.checkpoints", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.startswith("Usage: python -m sida_edm2.checkpoints") and "convert" in out
