#!/usr/bin/env bash
# Issue 21's GPU run in one go: bench/worker_gpu.py on the device machine, all figures printed and saved to $OUT.
#
# The device machine (see /work/.library/device/README.md) is offline, has Python 3.12 with JAX and PyTorch built
# for CUDA, and no TensorFlow, Keras, pydicom or ../shared/data. Everything it lacks travels with the call as
# ignored folders named in `carry` (both are in .gitignore):
#
#   .whl/  wheels for cp312, made here once (7 MiB; versions as in our .venv):
#            python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#              --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#              --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0 \
#              pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0
#          (Keras's other needs, absl-py, h5py, ml-dtypes, rich, packaging, and numpy, scipy, pillow,
#          prometheus-client are in the machine's image.)
#   .gpu/  covid-sources.npz, 96 grey source images (6 MiB), made here once:
#            .venv/bin/python bench/worker_gpu.py --task covid-ct --export-sources .gpu/covid-sources.npz
#          The series themselves (CT 512 x 512, 16-bit, uncompressed and JPEG 2000) are made there, in a few
#          seconds per hundred slices: DICOM made from the data set never leaves a machine or enters git.
#
# Call (one call; about 6 minutes of the 15 with the start):
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".gpu"], timeout_s=540)
# Figures: $OUT/worker_gpu_jax.{log,json} (and _torch when time is left); copy them to docs/results.md.
set -uo pipefail
OUT=${OUT:-/tmp/worker-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: is .whl carried?"; exit 2; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# JAX takes 75% of the card at its first call by default; the worker shares it with nothing here, but growing
# on demand keeps the figure honest about what one worker needs.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
[ -f .gpu/covid-sources.npz ] || { echo "no .gpu/covid-sources.npz: is .gpu carried?"; exit 2; }

# Batch 128: a device-sized batch (a GPU does 32 slices in a few ms, so per-call overhead dominates at 32); the
# bare model is measured at the same size. 48 series x 32 slices = 1536 frames per run.
KERAS_BACKEND=jax timeout 400 python3 bench/worker_gpu.py --task covid-ct --sources .gpu/covid-sources.npz \
    --series 48 --slices 32 --batch-size 128 --frames-in-flight 2048 --processes 0 1 2 4 8 15 \
    --bare-seconds 10 --json "$OUT/worker_gpu_jax.json" 2>&1 | grep -v "^W0000\|^I0000\|^E0000" \
    | tee "$OUT/worker_gpu_jax.log"
status=${PIPESTATUS[0]}
echo "jax run: exit $status"

# The same on PyTorch, smaller (what is left of the call's time): the backend question, not the scaling one.
KERAS_BACKEND=torch timeout 100 python3 bench/worker_gpu.py --task covid-ct --sources .gpu/covid-sources.npz \
    --series 16 --slices 32 --batch-size 128 --syntax uncompressed --processes 0 15 --bare-seconds 5 \
    --json "$OUT/worker_gpu_torch.json" 2>&1 | tee "$OUT/worker_gpu_torch.log"
echo "torch run: exit ${PIPESTATUS[0]}"
exit "$status"
