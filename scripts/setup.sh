#!/usr/bin/env bash
# `make setup`: create .venv, or reuse it when pyproject.toml and this script are unchanged.
# torch/torchvision are pinned to the versions on this machine's disk; pillow-simd then
# replaces Pillow as the live PIL (AVX2 build where the CPU has it), with a visible
# fallback to stock Pillow where it cannot build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PILLOW_SIMD=pillow-simd==12.1.1.post0
stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-64)

if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
is_simd() { "$VENV/bin/python" -c 'from alexnet.doctor import is_pillow_simd as s; raise SystemExit(not s())' 2>/dev/null; }

# pillow-simd compiles (~1 min, CPU) while the dependencies install (mostly unpacking).
wheels=$(mktemp -d)
build_simd() {
  local cc="cc"
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && cc="cc -mavx2"
  echo "setup: building $PILLOW_SIMD with CC='$cc' to replace Pillow"
  CC="$cc" "${pip[@]}" wheel --quiet --no-cache-dir --no-deps -w "$wheels" "$PILLOW_SIMD" \
    >/tmp/pillow-simd-build.log 2>&1
}
builder=""
if ! is_simd; then
  build_simd &
  builder=$!
fi

echo "setup: installing the project and its pinned dependencies into $VENV (1-4 minutes)"
# uv unpacks the ~3 GB of torch wheels in parallel (~45 s here, pip ~3 min); pip is the
# fallback wherever uv cannot be installed or cannot reach the index. --compile-bytecode
# writes the .pyc files as pip does: without them, and with PYTHONDONTWRITEBYTECODE set
# (as on this machine), every process compiles torch's and Prefect's sources again,
# which doubled each stage's and test subprocess's start-up (`import torch` 7 s vs 4 s).
if "${pip[@]}" install --quiet uv 2>/dev/null &&
   "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python" -e '.[dev]'; then
  :
else
  echo "setup: uv unavailable, installing with pip"
  "${pip[@]}" install --quiet -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
fi

# (Installing the dependencies can bring stock Pillow back over pillow-simd.)
if [ -n "$builder" ] || ! is_simd; then
  if { if [ -n "$builder" ]; then wait "$builder"; else build_simd; fi; } &&
     ls "$wheels"/*.whl >/dev/null 2>&1; then
    "${pip[@]}" uninstall --quiet -y pillow pillow-simd 2>/dev/null || true
    "${pip[@]}" install --quiet --no-deps "$wheels"/*.whl
  else
    echo "WARNING: pillow-simd could not be built (log: /tmp/pillow-simd-build.log);" \
         "keeping stock Pillow: prepare will be slower." >&2
  fi
fi
rm -rf "$wheels"
"$VENV/bin/python" -c 'from alexnet.doctor import pil_facts; print("setup: PIL is", pil_facts()["PIL"])'
echo "setup: compiling the numba kernels into their cache (~15 s)"
"$VENV/bin/python" -c 'from alexnet.doctor import compile_kernels; compile_kernels()'
echo "$stamp" > "$VENV/.setup-stamp"
