"""Test host: a real ComfyUI (``scripts/sdn_host.py``), the pack loaded through ComfyUI's custom-node loader,
and models of the real SD1.5 / SDXL architectures with random weights. Nothing here downloads anything.
"""
import asyncio
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # only scripts/, never the repo root (see sdn_host.py)
sys.path.insert(0, str(REPO / "tests"))

import sdn_host  # noqa: E402


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    h = sdn_host.bootstrap(tmp_path_factory.mktemp("comfy_base"))
    # Test-only nodes (small real-architecture models) through the same loader.
    assert asyncio.run(h.nodes.load_custom_node(str(REPO / "tests" / "sdn_test_nodes")))
    return h


@pytest.fixture(scope="session")
def pack(host):
    """Import a pack submodule by dotted name: ``pack("attention.csa")``."""
    return host.pack_module


@pytest.fixture(scope="session")
def sd15_checkpoint(host):
    """File name (in models/checkpoints) of a full-size SD1.5 checkpoint with random weights."""
    from checkpoints import write_random_checkpoint

    folder = host.base_directory / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = "sdn-random-sd15.safetensors"
    if not (folder / name).exists():
        write_random_checkpoint(folder / name, "sd15")
    return name


@pytest.fixture(scope="session")
def flux_files(host):
    """File names of a Flux.1-dev workflow's models with random weights, written once per session into the host's
    model folders (tests/checkpoints.py ``write_random_flux_files``): ``{"unet" | "vae" | "clip_l" | "t5xxl": name}``."""
    from checkpoints import write_random_flux_files

    return write_random_flux_files(host)


@pytest.fixture(scope="session")
def qwen_image_files(host):
    """File names of a Qwen-Image workflow's models with random weights, written once per session into the
    host's model folders (tests/checkpoints.py ``write_random_qwen_image_files``): ``{"unet" | "vae" | "clip":
    name}``."""
    from checkpoints import write_random_qwen_image_files

    return write_random_qwen_image_files(host)


# Small UNets of the real SD1.5 / SDXL layouts, weights at scale 0.05: every attention layer visibly moves the
# sampled latents, so a wrong grouping, a layer with the wrong rate, CSA switched off or the wrong bank tokens
# fail the 2e-4 oracle tolerance (at 0.02 they stayed inside it; at 0.1 float noise grows past it). Patching
# clones them, so one instance serves every test.
@pytest.fixture(scope="session")
def sd15(host):
    from models import small_unet

    return small_unet("sd15", scale=0.05)


@pytest.fixture(scope="session")
def sdxl(host):
    from models import small_unet

    return small_unet("sdxl", scale=0.05)
