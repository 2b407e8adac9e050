#!/usr/bin/env bash
# Make what scripts/gpu_check.sh needs on a GPU machine with no network: wheels of the packages its
# PyTorch image lacks (.whl/, for its Python 3.12) and JACK's dummy server with PortAudio (.gpu/,
# copied from this machine's jackd2 and libportaudio2: `make setup` installs them). Both folders
# are git-ignored; carry them with the call.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .gpu
mkdir -p .whl .gpu/lib/jack .gpu/bin
plat=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
done
for pkg in python-osc==1.10.2 mido==1.3.3 python-rtmidi==1.5.8 sounddevice==0.5.6 cffi==2.1.1 pycparser==3.12 \
           pedalboard==0.9.26 LinkPython-extern==1.3.0 soundfile==0.14.0 JACK-Client==0.5.7; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl "$pkg"
done
lib=/lib/x86_64-linux-gnu
cp "$(command -v jackd)" .gpu/bin/
cp "$lib/jack/jack_dummy.so" .gpu/lib/jack/ 2>/dev/null || cp /usr/lib/x86_64-linux-gnu/jack/jack_dummy.so .gpu/lib/jack/
for l in libasound.so.2 libcap.so.2 libdb-5.3.so libdbus-1.so.3 libgcrypt.so.20 libgpg-error.so.0 libjack.so.0 \
         libjackserver.so.0 liblz4.so.1 liblzma.so.5 libopus.so.0 libsystemd.so.0 libzstd.so.1 libportaudio.so.2; do
    cp -L "$lib/$l" .gpu/lib/
done
cp "$(command -v jack_lsp)" .gpu/bin/
mkdir -p .gpu/alsa && cp -r /usr/share/alsa/* .gpu/alsa/  # ALSA's configuration, for PortAudio's start-up
du -sh .whl .gpu
