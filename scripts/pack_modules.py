"""The pack's ComfyUI-free modules (``story.layout``, ``story.parser``...) for scripts that run without ComfyUI."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
PACKAGE = "sdn_scripts_pack"


def pack_module(name: str) -> types.ModuleType:
    """The pack submodule ``name`` (dotted, e.g. ``"story.layout"``).

    Imported as a submodule of a package named ``sdn_scripts_pack`` whose path is the pack root, so relative
    imports (``..errors``) work while the pack's ``__init__`` (which needs ComfyUI) never runs and the pack root
    never goes on sys.path (its nodes/ would shadow ComfyUI's nodes.py).
    """
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(PACK)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")
