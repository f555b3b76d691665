#!/usr/bin/env bash
# `make setup`: create .venv, or reuse it when pyproject.toml, requirements.lock and this
# script are unchanged. Every package is installed at the lock's version (`make lock`).
# torch/torchvision are pinned to the versions on this machine's disk; pillow-simd then
# replaces Pillow as the live PIL (AVX2 build where the CPU has it), with a visible
# fallback to stock Pillow where it cannot build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PILLOW_SIMD=pillow-simd==12.1.1.post0

# The codecs of stock Pillow wheels that matter for photos. pillow-simd's setup.py compiles
# in each one whose headers it finds and silently leaves out the others (JPEG and zlib it
# requires: without them it does not build at all), so a machine without the -dev packages
# gets a PIL that cannot open TIFF or WebP files nor convert ICC profiles. One row each:
# the name PIL.features gives it | the headers setup.py looks for | the Debian/Ubuntu
# package that has them (libjpeg-dev brings libjpeg62-turbo-dev on Debian, libjpeg-turbo8-dev
# on Ubuntu) | what it is.
codecs=(
  "jpg|jpeglib.h|libjpeg-dev|JPEG (libjpeg-turbo)"
  "zlib|zlib.h|zlib1g-dev|PNG (zlib)"
  "libtiff|tiff.h|libtiff-dev|TIFF (libtiff)"
  "webp|webp/encode.h webp/decode.h webp/mux.h webp/demux.h|libwebp-dev|WebP (libwebp)"
  "littlecms2|lcms2.h|liblcms2-dev|ICC colour profiles (LittleCMS, PIL.ImageCms)"
)
# The compiler's own include search, as in the build (multiarch dirs included).
has_header() { cc -E - <<<"#include <$1>" >/dev/null 2>&1; }
buildable=()  # PIL.features names of the codecs whose headers are all here
if command -v cc >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo "sudo ")
  for row in "${codecs[@]}"; do
    IFS="|" read -r name headers package what <<<"$row"
    missing=""
    for header in $headers; do has_header "$header" || missing+=" $header"; done
    if [ -z "$missing" ]; then
      buildable+=("$name")
    elif [ "$name" = jpg ] || [ "$name" = zlib ]; then
      echo "WARNING: no${missing}: pillow-simd cannot build without $what, so PIL stays" \
           "stock Pillow; install it: ${sudo}apt-get install $package, then re-run make setup" >&2
    else
      echo "WARNING: no${missing}: pillow-simd will lack $what;" \
           "install it: ${sudo}apt-get install $package, then re-run make setup" >&2
    fi
  done
  # Two more it compiles in where pkg-config finds them (their headers sit in versioned
  # dirs), with no warning: few photos are JPEG 2000 or AVIF, and Debian 12's libavif is
  # older than the 1.0 it needs. Listed so that installing them rebuilds too.
  for row in "jpg_2000|libopenjp2" "avif|libavif >= 1.0"; do
    IFS="|" read -r name module <<<"$row"
    if pkg-config --exists "$module" 2>/dev/null; then buildable+=("$name"); fi
  done
fi  # (without a compiler pillow-simd cannot build: the warning below says so)
# Installing a -dev package changes the stamp, so the next `make setup` rebuilds.
stamp=$({ cat pyproject.toml requirements.lock scripts/setup.sh; echo "codecs: ${buildable[*]}"; } |
        sha256sum | cut -c1-64)

if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

# A venv without pip: given one (ensurepip, as `uv venv` makes them), else made again,
# as is what a failed `python3 -m venv` leaves (Debian without python3-venv has no
# ensurepip), so that venv's own error, which package to install, is said each time.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1 &&
   ! "$VENV/bin/python" -m ensurepip >/dev/null 2>&1; then
  "$PYTHON" -m venv --clear "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
is_simd() { "$VENV/bin/python" -c 'from alexnet.doctor import is_pillow_simd as s; raise SystemExit(not s())' 2>/dev/null; }
# The codecs among "$@" that the live PIL lacks (all of them where PIL does not import).
pil_lacks() {
  "$VENV/bin/python" -c 'import sys; from PIL import features as f
print(*(n for n in sys.argv[1:] if not f.check(n)))' "$@" 2>/dev/null || echo "$@"
}

# pillow-simd compiles (~1 min, CPU) while the dependencies install (mostly unpacking).
wheels=$(mktemp -d)
build_simd() {
  local cc="cc"
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && cc="cc -mavx2"
  echo "setup: building $PILLOW_SIMD with CC='$cc' to replace Pillow"
  # --verbose: the log keeps setup.py's "--- LITTLECMS2 support available" summary.
  CC="$cc" "${pip[@]}" wheel --verbose --no-cache-dir --no-deps -w "$wheels" "$PILLOW_SIMD" \
    >/tmp/pillow-simd-build.log 2>&1
}
builder=""
# Also rebuilt when a codec's headers arrived after the live pillow-simd was built.
if ! is_simd || [ -n "$(pil_lacks "${buildable[@]}")" ]; then
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
   "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python" \
     -c requirements.lock -e '.[dev]'; then
  :
else
  echo "setup: uv unavailable, installing with pip"
  "${pip[@]}" install --quiet -c requirements.lock -e '.[dev]' \
    2> >(grep -v "is ignored: it is neither" >&2)
fi

# (Installing the dependencies can bring stock Pillow back over pillow-simd.)
if [ -n "$builder" ] || ! is_simd; then
  if { if [ -n "$builder" ]; then wait "$builder"; else build_simd; fi; } &&
     ls "$wheels"/*.whl >/dev/null 2>&1; then
    "${pip[@]}" uninstall --quiet -y pillow pillow-simd 2>/dev/null || true
    "${pip[@]}" install --quiet --no-deps "$wheels"/*.whl
  else
    if is_simd; then kept="the pillow-simd already installed"
    else kept="stock Pillow: prepare will be slower"; fi
    echo "WARNING: pillow-simd could not be built (log: /tmp/pillow-simd-build.log);" \
         "keeping $kept." >&2
  fi
fi
rm -rf "$wheels"
lacking=$(pil_lacks "${buildable[@]}")
if [ -n "$lacking" ]; then
  echo "WARNING: PIL lacks $lacking although the headers are here;" \
       "see /tmp/pillow-simd-build.log (setup.py's summary of what it found)" >&2
fi
"$VENV/bin/python" -c 'from alexnet.doctor import pil_facts; print("setup: PIL is", pil_facts()["PIL"])'
echo "setup: compiling the numba kernels into their cache (~15 s)"
"$VENV/bin/python" -c 'from alexnet.doctor import compile_kernels; compile_kernels()'
echo "$stamp" > "$VENV/.setup-stamp"
