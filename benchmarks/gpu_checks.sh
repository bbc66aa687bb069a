#!/usr/bin/env bash
# The CUDA checks, run by hand on a GPU machine (the device tool), one command each (each fits one 10-minute call):
#   bash benchmarks/gpu_checks.sh              full-size forward at the real resolution (time and peak memory per
#                                              stage), the released stitched decoder at 13 and 21 views and the tests
#                                              marked `gpu` (gsplat vs. torch renderer, recon on CUDA, the throughput
#                                              levers on CUDA)
#   bash benchmarks/gpu_checks.sh throughput   benchmarks/gpu_throughput.py: s/scene end to end and per stage at
#                                              batch 1/2/4/8, each lever on/off, the FLOP floor, the 14B fit (~5-8 min)
#   bash benchmarks/gpu_checks.sh all          both (longer than one device call)
# Results go to $OUT (default out/gpu). Packages the GPU image lacks are installed from ./.devwheels when present.
set -u
WHAT=${1:-checks}
case "$WHAT" in checks|throughput|all) ;; *) echo "usage: $0 [checks|throughput|all]" >&2; exit 2 ;; esac
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ -d .devwheels ]; then
  python3 -m pip install -q --no-index --find-links .devwheels diffusers transformers huggingface_hub pydantic plyfile gsplat 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "$WHAT" != throughput ]; then
  timeout 200 python3 benchmarks/full_size_forward.py > "$OUT/full_size.json" 2> "$OUT/full_size.log"; echo "full_size rc=$?"
  timeout 200 python3 benchmarks/release_decoder_forward.py > "$OUT/release_decoder.json" 2> "$OUT/release_decoder.log"; echo "release decoder rc=$?"
  timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_render.py tests/test_recon.py tests/test_throughput_levers.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
  tail -4 "$OUT/gpu_tests.log"; tail -3 "$OUT/full_size.log"; cat "$OUT/full_size.json" "$OUT/release_decoder.json"
fi
if [ "$WHAT" != checks ]; then
  # the JSON is rewritten after every section: a run cut short by the timeout keeps what it measured
  timeout 540 python3 benchmarks/gpu_throughput.py --out-dir "$OUT" > "$OUT/gpu_throughput.txt" 2> "$OUT/gpu_throughput.log"
  echo "gpu throughput rc=$?"; tail -5 "$OUT/gpu_throughput.log"; cat "$OUT/gpu_throughput.txt"
fi
