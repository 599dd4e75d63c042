#!/usr/bin/env bash
# The accelerator checks of the speed benchmarks in one pass, for a lent GPU machine (or any
# machine whose python3 has a CUDA jax and torch): results land in $OUT (default bench/results/gpu).
#
#   bash bench/gpu.sh                      # the full check: ResNet-50 and mixed attention at 224 px
#   BACKBONES=resnet BATCH=8 STEPS=2 SIZES=cpu bash bench/gpu.sh   # a dry run on a CPU
#
# 1. bench.train_step --against torch: histojax's bf16 step of configs/bach_dml.py (Multi-Similarity,
#    device-side colour augmentation) and the PyTorch reference (channels-last, bf16 autocast) on the
#    same chip, batch $BATCH at 224 px; FLOPs per image and MFU from XLA's cost analysis.
# 2. bench.input_pipeline: images/s the Grain pipeline delivers on this host by worker count, tiles
#    decoded once into memory and decoded on every read, against what the ResNet-50 step consumes.
# Packages the machine's image lacks travel as wheels: .whl (needed) and .whl2 (the pinned flax,
# optax and orbax, used only when they import beside the machine's jax). Made on a machine with
# the index (Python 3.12 machine there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#     ml-collections==1.1.0 dm-pix==0.4.5 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
#   (same into .whl2: flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8)
# Without them the machine's own packages are used.
set -u
OUT=${OUT:-bench/results/gpu}
PY=${PY:-python3}
BACKBONES=${BACKBONES:-resnet,mixed_attention}
SIZES=${SIZES:-224}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
WORKERS=${WORKERS:-0,4,8,12,16}
PIPELINE_CONFIG=${PIPELINE_CONFIG:-configs/bach_dml.py:backbone=resnet}
DECODE=${DECODE:-once,every_read}
STEP=${STEP:-1}  # 0: the input pipeline alone
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/histojax_jax_cache

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if compgen -G ".whl2/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site2 .whl2/*.whl
  if PYTHONPATH=/tmp/site2:${PYTHONPATH:-} "$PY" -c "from histojax import step" 2>"$OUT/pinned_flax_import.txt"; then
    export PYTHONPATH=/tmp/site2:${PYTHONPATH:-}
  fi
fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>/dev/null
  nproc
  "$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"

[ "$STEP" = 0 ] || timeout 400 "$PY" -m bench.train_step --against torch --backbones "$BACKBONES" --sizes "$SIZES" \
  --batch "$BATCH" --steps "$STEPS" --out "$OUT/train_step_vs_torch.json" 2>&1 | tee "$OUT/train_step.log" \
  | grep -v "^W0000\|^I0000"
timeout 200 "$PY" -m bench.input_pipeline --configs "$PIPELINE_CONFIG" --workers "$WORKERS" --batches 40 \
  --decode "$DECODE" --consumption_steps 10 --out "$OUT/input_pipeline.json" 2>&1 | tee "$OUT/input_pipeline.log" \
  | grep -v "^W0000\|^I0000"
# 3. bench.encoders: the giant foundation-model presets (ViT-H/14 and ViT-g, too slow for the CPU) at full depth,
#    histojax against timm / transformers on the same GPU, bf16, at 224 px (needs timm and transformers beside torch;
#    ~5 GB of random weights per ViT-g preset are written to /tmp and converted first).
ENCODERS=${ENCODERS:-1}
ENC_PRESETS=${ENC_PRESETS:-uni2_h,virchow,virchow2,h_optimus_0,h_optimus_1,prov_gigapath,midnight}
[ "$ENCODERS" = 0 ] || timeout 2400 "$PY" -m bench.encoders --presets "$ENC_PRESETS" --dtype bfloat16 \
  --batch "${ENC_BATCH:-64}" --steps "${ENC_STEPS:-10}" --threads "$(nproc)" --out "$OUT/encoders.json" 2>&1 \
  | tee "$OUT/encoders.log" | grep -v "^W0000\|^I0000"
