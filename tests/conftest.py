"""Test host: a real ComfyUI (``scripts/sdn_host.py``), the pack loaded through ComfyUI's custom-node loader,
and models of the real SD1.5 / SDXL architectures with random weights. Nothing here downloads anything.
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # only scripts/, never the repo root (see sdn_host.py)
sys.path.insert(0, str(REPO / "tests"))

import sdn_host  # noqa: E402


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    return sdn_host.bootstrap(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def pack(host):
    """Import a pack submodule by dotted name: ``pack("attention.csa")``."""
    return host.pack_module
