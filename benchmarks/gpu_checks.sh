#!/usr/bin/env bash
# The CUDA checks, run by hand on a GPU machine (the device tool): full-size forward at the real
# resolution (time and peak memory per stage), the released stitched decoder at 13 and 21 views and the tests marked `gpu` (gsplat vs. torch renderer,
# recon on CUDA). Packages the GPU image lacks are installed from ./.devwheels when present.
set -u
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ -d .devwheels ]; then
  python3 -m pip install -q --no-index --find-links .devwheels diffusers transformers huggingface_hub pydantic plyfile gsplat 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 200 python3 benchmarks/full_size_forward.py > "$OUT/full_size.json" 2> "$OUT/full_size.log"; echo "full_size rc=$?"
timeout 200 python3 benchmarks/release_decoder_forward.py > "$OUT/release_decoder.json" 2> "$OUT/release_decoder.log"; echo "release decoder rc=$?"
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_render.py tests/test_recon.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
tail -4 "$OUT/gpu_tests.log"; tail -3 "$OUT/full_size.log"; cat "$OUT/full_size.json" "$OUT/release_decoder.json"
