#!/usr/bin/env bash
# One idempotent setup for `make run`, `make test` and CI: system libraries, .venv, packages.
# Re-running it is cheap: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user: the ARM64 kernel checks under qemu.
# chromium and chromium-driver: the panel tests drive a real headless browser (Debian's, never downloaded).
# jack-midi-clock and klick: the clock tests' real MIDI clock and JACK timebase master with a tempo map.
# ardour: the real Ardour, headless (ardour7-lua), whose OSC surface tests/bridge/clock/test_ardour_real.py
# follows; it brings some 80 packages, and the test skips where it is absent.
APT_PKGS=(libportaudio2 jackd2 liblo-tools libsndfile1 puredata-core lua5.4 gcc gcc-aarch64-linux-gnu
          libc6-dev-arm64-cross qemu-user chromium chromium-driver jack-midi-clock klick ardour)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # --no-install-recommends: without it jackd2 drags in GTK and Qt.
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing system packages: ${missing[*]}" >&2
        echo "setup: install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi

stamp="$VENV/.musicbridge-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "setup: installing torch (CPU wheel)"
        "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
    fi
    echo "setup: installing musicbridge and its dependencies"
    "$VENV/bin/pip" install -q -e ".[test,remote]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, transformers, pythonosc, mido, pedalboard, ray.serve, websockets, bridge.cli" \
        || { echo "setup: the install did not complete" >&2; exit 1; }
    echo "$want" > "$stamp"
fi

# The decode step's C kernels, compiled for this CPU into the cache folder (about a second);
# without a compiler musicbridge runs PyTorch's kernels and says so.
"$VENV/bin/python" -c "from model.kernels import gemv; print('setup: C kernels:', gemv.build())" \
    || echo "setup: the C kernels did not build (is gcc installed?); the decoder will use PyTorch's slower kernels" >&2

# The project's own modules byte-compiled: pip leaves an editable install's uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) Python would compile them again
# in every process, 0.1 s of each `musicbridge generate` (measured). Stale files are harmless:
# Python checks each against its source.
"$VENV/bin/python" -m compileall -q -j 0 bridge model plugin_host >/dev/null || true
