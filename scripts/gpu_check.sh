#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA GPU and its own PyTorch (the lent device
# machine: no network, so the packages PyTorch's image lacks come as wheels in .whl/ and JACK's
# dummy server with PortAudio in .gpu/, both made by scripts/gpu_bundle.sh). Logs and JSON go
# under $OUT. Phases (all by default, or those named as arguments):
#   tests  tests/model/test_cuda_step.py: CUDA graphs against the eager step, GPU against CPU, float16
#   bench  musicbridge bench --device cuda: against transformers' generate on the same GPU, one run
#   audio  PortAudio on a JACK dummy server (what the jam's output needs)
#   jam    musicbridge bench --jam --device cuda: a live jam's chunk latency
#   probe  scripts/gpu_probe.py: where a step's time goes (kernels, torch.compile)
# BENCH_ARGS, JAM_ARGS and PROBE_ARGS replace each phase's default options (see below).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MUSICBRIDGE_CACHE=/tmp/mb-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PROBE_ARGS=${PROBE_ARGS:---compile}
BENCH_ARGS=${BENCH_ARGS:---dtype float16,bfloat16,float32 --variations 1,2,4 --quality}
JAM_ARGS=${JAM_ARGS:-}
stamp() { echo "== $(date +%T) $*"; }
phases=${*:-tests bench audio jam probe}

stamp machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
grep -m1 "model name" /proc/cpuinfo | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
# JACK and PortAudio from .gpu/ where the image has none (only libraries it lacks are added).
for f in .gpu/lib/*.so*; do
    n=$(basename "$f")
    ldconfig -p | grep -qF "$n (" || cp "$f" /usr/local/lib/
done
ln -sf libportaudio.so.2 /usr/local/lib/libportaudio.so
ldconfig
export PATH=$PWD/.gpu/bin:$PATH JACK_DRIVER_DIR=$PWD/.gpu/lib/jack
[ -e /usr/share/alsa/alsa.conf ] || export ALSA_CONFIG_DIR=$PWD/.gpu/alsa ALSA_CONFIG_PATH=$PWD/.gpu/alsa/alsa.conf

for phase in $phases; do
    stamp "$phase"
    case $phase in
    tests)
        timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/model/test_cuda_step.py 2>&1 \
            | tee "$OUT/pytest.txt"
        grep -qE "passed" "$OUT/pytest.txt" || { echo "GPU tests did not run; stopping"; exit 1; } ;;
    bench)
        timeout 180 python3 -m bridge.cli bench --device cuda --arch musicgen-small --seconds 10 $BENCH_ARGS \
            --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" ;;
    audio)
        jackd --no-realtime -n mbdiag -d dummy -r 48000 -p 256 >"$OUT/jackd.txt" 2>&1 &
        jpid=$!
        sleep 1
        JACK_DEFAULT_SERVER=mbdiag jack_lsp 2>&1 | head -5
        JACK_DEFAULT_SERVER=mbdiag timeout 20 python3 -X faulthandler -c "
import sounddevice as sd, numpy as np, time
print(sd.query_devices())
with sd.OutputStream(channels=2, samplerate=48000, callback=lambda o, f, t, s: o.fill(0)):
    time.sleep(1)
print('stream ok')" 2>&1 | tee "$OUT/audio.txt"
        kill $jpid 2>/dev/null; wait $jpid 2>/dev/null ;;
    jam)
        timeout 150 python3 -X faulthandler -m bridge.cli bench --jam --device cuda --arch musicgen-small --dtype float16 \
            --jam-seconds 12 $JAM_ARGS --json "$OUT/jam.json" 2>&1 | tee "$OUT/jam.txt" ;;
    probe)
        timeout 150 python3 scripts/gpu_probe.py $PROBE_ARGS --json "$OUT/probe.json" 2>&1 | tee "$OUT/probe.txt" ;;
    esac
done
stamp done
