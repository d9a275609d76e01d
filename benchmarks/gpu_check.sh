#!/usr/bin/env bash
# Issue 7's GPU check, one call of under 5 minutes on one H100 or H200: VGG-16 training in bfloat16
# at 128, 256 and 512 images per device (compile, warm up, time; a table of img/s, step time, MFU vs
# 989 TFLOP/s, peak memory), a profile of the largest batch with its top ops, then XLA's memory plan
# per remat policy. Everything goes through `python -m vgg_jax.bench`.
#
# Run from the repository root:   bash benchmarks/gpu_check.sh
# Output: the console, and under ${OUT:-/tmp/vgg_jax_gpu_check}: log.txt and the trace (*.xplane.pb,
# gzipped when large; open it with TensorBoard's profile plugin or XProf).
#
# Needs: Python with jax for CUDA (requirements.txt pins jax 0.10.2: `pip install "jax[cuda12]==0.10.2"`;
# a machine's own jax with CUDA also works), flax, optax, numpy, and the pure-Python ml_collections
# and clu. Wheels found in .whl/ are installed into /tmp/site first (no network needed there). On the
# workplace's device machines (jax 0.11.2 for CUDA 13, flax and optax already installed) only
# ml_collections and clu are missing; prepare them here, in the repository root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 clu==0.0.12
# then run `bash benchmarks/gpu_check.sh` there with carry=[".whl"] and timeout_s of about 420.
set -uo pipefail
OUT=${OUT:-/tmp/vgg_jax_gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BATCHES=${BATCHES:-128 256 512}
MEMORY_BATCHES=${MEMORY_BATCHES:-256 512}
MODEL_ARGS=${MODEL_ARGS:---model vgg16 --image_size 224}
PLATFORM=${PLATFORM:-gpu}  # PLATFORM=cpu with a tiny MODEL_ARGS: the test suite's dry run of this script
# Wall-clock budget in seconds (one device call): training gets BUDGET_S - 20, the memory plan what is left
# of it, and is skipped when under 70 s remain. BUDGET_S=0: no limits (the CPU dry run; machine load varies).
BUDGET_S=${BUDGET_S:-290}
limit() { if [ "$BUDGET_S" -gt 0 ]; then echo "timeout $1"; fi; }

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || { echo "installing .whl/ failed"; exit 1; }
fi

echo "== device ($(date -u +%FT%TZ))"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
PLATFORM=$PLATFORM $PY - <<'EOF' || exit 1
import importlib, os, sys
import jax
print("python", sys.version.split()[0], "|", ", ".join(
    f"{m} {importlib.import_module(m).__version__}" for m in ("jax", "jaxlib", "flax", "optax", "numpy")))
try:
    print(jax.devices(os.environ["PLATFORM"]))
except RuntimeError as e:
    sys.exit(f"No {os.environ['PLATFORM']} for jax ({e}). Install it: pip install 'jax[cuda12]==0.10.2' flax==0.12.8 optax==0.2.8 "
             "ml-collections==1.1.0 clu==0.0.12")
EOF

echo "== bf16 training ($MODEL_ARGS), batches per device: $BATCHES"
rm -rf /tmp/vgg_jax_trace
$(limit $((BUDGET_S - 20))) $PY -m vgg_jax.bench train $MODEL_ARGS --dtype bfloat16 --batch=${BATCHES// /,} \
  --steps 10 --warmup 3 --profile_dir /tmp/vgg_jax_trace --profile_steps 3
for f in $(find /tmp/vgg_jax_trace -name '*.xplane.pb' 2> /dev/null); do
  if [ "$(stat -c %s "$f")" -gt 15000000 ]; then gzip -c "$f" > "$OUT/vgg16_bf16.xplane.pb.gz"; else cp "$f" "$OUT/vgg16_bf16.xplane.pb"; fi
done

if [ "$BUDGET_S" -eq 0 ] || [ "$SECONDS" -lt $((BUDGET_S - 70)) ]; then
  echo "== XLA memory plan per remat policy (compile only, autotuning off), after ${SECONDS}s"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" $(limit $((BUDGET_S - SECONDS))) \
    $PY -m vgg_jax.bench memory $MODEL_ARGS --dtype bfloat16 --batch=${MEMORY_BATCHES// /,} --remat=none,convs,blocks --budget_gb 80
else
  echo "== skipped the memory plan: ${SECONDS}s used"
fi
echo "== done in ${SECONDS}s"
