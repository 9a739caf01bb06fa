#!/usr/bin/env bash
# Wheels the GPU machine lacks, downloaded here into .whl/ (git-ignored) for bench/gpu_device.sh.
#
#     bash bench/gpu_wheels.sh          # then: device run with carry [".whl"]
#
# The lent machine has torch, numpy, scipy and safetensors (its image has more: see the device
# tool's KINDS.md) and no network. Carried: deepinv (+ natsort) for the random-weight ADM U-Net
# of bench/gpu.py (deepinv's DiffUNet; without it that model is skipped, and the JSON says so),
# and the service's pure-Python stack for the `cuda` tests of the worker. Versions are the ones
# installed in this checkout's .venv (so pydantic and pydantic-core match); CPython 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
PKGS=(deepinv natsort fastapi fastapi-offline starlette pydantic pydantic-core pydantic-settings python-dotenv
      annotated-types annotated-doc typing-inspection typing-extensions sqlalchemy greenlet python-multipart uvicorn)
DEST=${WHEEL_DIR:-.whl}
mkdir -p "$DEST"
specs=()
for p in "${PKGS[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$p")
  specs+=("${p}${v:+==$v}")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
ls -la "$DEST"
du -sh "$DEST"
