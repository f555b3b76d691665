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
echo "setup: installing the project and its pinned dependencies into $VENV (minutes on a fresh machine)"
"${pip[@]}" install --quiet -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)

is_simd() { "$VENV/bin/python" -c 'from alexnet.doctor import is_pillow_simd as s; raise SystemExit(not s())'; }
if ! is_simd; then
  cc="cc"
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && cc="cc -mavx2"
  echo "setup: building $PILLOW_SIMD with CC='$cc' to replace Pillow (~30 s)"
  "${pip[@]}" uninstall --quiet -y pillow pillow-simd 2>/dev/null || true
  if ! CC="$cc" "${pip[@]}" install --quiet --no-cache-dir --no-deps "$PILLOW_SIMD" 2>/tmp/pillow-simd-build.log; then
    echo "WARNING: pillow-simd could not be built (log: /tmp/pillow-simd-build.log);" \
         "falling back to stock Pillow: prepare will be slower." >&2
    "${pip[@]}" install --quiet pillow
  fi
fi
"$VENV/bin/python" -c 'from alexnet.doctor import pil_facts; print("setup: PIL is", pil_facts()["PIL"])'
echo "$stamp" > "$VENV/.setup-stamp"
