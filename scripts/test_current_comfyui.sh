#!/usr/bin/env bash
# The suite against a current ComfyUI checkout instead of the pinned 0.3.75 (not run by CI):
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/test_current_comfyui.sh [pytest args]
# Builds or updates a venv for it ($SDN_VENV, default .venv-current; PYTHON picks the interpreter) with CPU
# torch 2.13.0, the checkout's requirements.txt without torch/torchvision/torchaudio (no wheels for this CPU
# torch: scripts/sdn_host.py stands in for them when they fail to import), the web frontend and the optional
# extras, plus the test tools. Fetches no ComfyUI: COMFYUI_PATH must already hold one (no test writes into it:
# the main-job tests use a throwaway checkout of it). The frontend tests skip unless the frontend version the
# checkout pins is installed; the pinned copy's main-job tests skip (it is not installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
export COMFYUI_PATH
VENV=${SDN_VENV:-.venv-current}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3.11}" -m venv "$VENV"
SKIP='torch|torchvision|torchaudio|comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs'
SKIP+='|kornia|spandrel|pyopengl|comfy-angle'
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -c <(echo torch==2.13.0) -r tests/requirements-host.txt \
  -r <(grep -viE "^[[:space:]]*(#|$)|^($SKIP)([^a-z0-9_.-]|$)" "$COMFYUI_PATH/requirements.txt")
exec "$VENV/bin/python" -m pytest tests "$@"
