#!/usr/bin/env bash
# One NVIDIA GPU (H100/H200), at most ~8 minutes: attention memory & speed in bf16 at
# head_dim 128 up to T = 65,536 (dense / chunked / cudnn; GQA and sliding-window rows),
# then the training-throughput presets. Results: benchmarks/results/*_<device>_jax<version>*.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from the repository root
#   DRY_RUN=1 bash benchmarks/gpu.sh       # anywhere (CPU): tiny sizes, checks every flag
#
# Needs jax (CUDA), flax, optax, orbax-checkpoint, absl-py, matplotlib; not
# tensorflow-datasets or grain (everything runs on synthetic inputs).
# Each stage has its own time limit, and the attention script saves its JSON after
# every configuration, so a stage cut short still leaves its finished rows.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"

TAG=$(timeout 120 "$PY" -c '
import re, jax
d = jax.devices()[0]
print(re.sub(r"[^A-Za-z0-9]+", "-", d.device_kind).strip("-").lower() + "_jax" + jax.__version__)
') || TAG=unknown-device
DATE=$(date -u +%Y-%m-%d)
echo "== device/jax: $TAG   date: $DATE"
timeout 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

if [ "${DRY_RUN:-0}" = 1 ]; then  # tiny CPU-sized settings; the same flags otherwise
  LENGTHS=128,256; WINDOW=window64; HEADS=8; HEAD_DIM=16; DTYPE=float32
  T_ATTN=300; T_VAR=300; T_TP=600; TP_EXTRA="--small --repeats=1 --warmup=0"
  OUT=${OUT_DIR:-/tmp/tfx_gpu_sh_dry_run}; mkdir -p "$OUT"
else
  LENGTHS=1024,2048,4096,8192,16384,32768,65536; WINDOW=window4096; HEADS=8; HEAD_DIM=128
  DTYPE=bfloat16; T_ATTN=200; T_VAR=110; T_TP=150; TP_EXTRA="--repeats=5 --warmup=1"
fi
ATTN="$PY experiments/attention_memory.py --heads=$HEADS --head_dim=$HEAD_DIM --batch=1
  --dtype=$DTYPE --causal --repeats=3 --warmup=1 --time_budget_s=2 --isolate=false
  --out_dir=$OUT"

echo "== 1/3 attention, multi-head: dense / chunked / cudnn (limit ${T_ATTN}s)"
timeout -k 10 "$T_ATTN" $ATTN --lengths="$LENGTHS" --implementations=cudnn,chunked,dense \
  --variants=mha --out_name="attention_memory_gpu_${TAG}_${DTYPE}_causal_mha_${DATE}"
echo "   exit $?"

echo "== 2/3 attention, GQA 8/2 heads and a sliding window (limit ${T_VAR}s)"
timeout -k 10 "$T_VAR" $ATTN --lengths="$LENGTHS" --implementations=cudnn,chunked \
  --variants=gqa2,"$WINDOW" --out_name="attention_memory_gpu_${TAG}_${DTYPE}_causal_gqa_window_${DATE}"
echo "   exit $?"

echo "== 3/3 training throughput presets (limit ${T_TP}s)"
timeout -k 10 "$T_TP" "$PY" experiments/throughput.py --dtype=bfloat16 $TP_EXTRA \
  --out_dir="$OUT" --out_name="throughput_gpu_${TAG}_${DATE}"
echo "   exit $?"
ls -l "$OUT" | grep -F -- "$DATE" || true
