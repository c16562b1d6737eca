"""What lets the suite and the main job run on the pinned ComfyUI 0.3.75 and on a current checkout
(``COMFYUI_PATH``, see scripts/test_current_comfyui.sh): stand-ins for packages ComfyUI imports at module level
but that have no wheel for the test host's CPU torch (torchvision, torchaudio)."""
import importlib
import importlib.util
import sys

import pytest

import sdn_host


@pytest.fixture
def absent_package():
    """A package name nothing provides; its stand-in finder and modules are removed afterwards."""
    name = "sdn_absent_package"
    finders = list(sys.meta_path)
    yield name
    sys.meta_path[:] = finders
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_stand_in_imports_every_submodule_and_fails_only_when_used(absent_package):
    sdn_host.stand_in_if_broken(absent_package)
    # the module-level import forms current ComfyUI uses for torchvision and torchaudio
    functional = importlib.import_module(absent_package + ".transforms.functional")
    ops = importlib.import_module(absent_package + ".ops")
    assert importlib.util.find_spec(absent_package + ".models.optical_flow") is not None
    mode = functional.InterpolationMode.BICUBIC  # enum members in default arguments
    with pytest.raises(sdn_host.HostError, match=rf"{absent_package}\.ops\.roi_align is not installed"):
        ops.roi_align()
    with pytest.raises(sdn_host.HostError, match="InterpolationMode.BICUBIC is not installed"):
        mode()


def test_importable_package_is_left_alone():
    finders = list(sys.meta_path)
    sdn_host.stand_in_if_broken("json")
    assert sys.meta_path == finders


def test_torchvision_and_torchaudio_import_on_the_host(host):
    # the real packages where they work, stand-ins otherwise: current ComfyUI imports both at module level
    for package in ("torchvision", "torchaudio"):
        assert importlib.import_module(package).__spec__ is not None
