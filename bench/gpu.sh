#!/usr/bin/env bash
# The GPU throughput check of issue 8, in one call on the lent machine (one H100; see
# ../shared/gpu/README.md). At most ~5 minutes: each part has a time budget and skips what does not fit.
#
# Once, on the CPU machine, from the repository root with the project's .venv active (the GPU machine
# has no network, and lacks deepspeed, hjson, pydantic and PyYAML):
#     echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"; ../shared/gpu/wheels.sh pyyaml
# Then run it through the device tool with carry [".whl"]:   bash bench/gpu.sh
# It prints one table per part and, last, all of them together (also written to $OUT/gpu-throughput.md
# when $OUT is set, with the raw rows as JSON beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517
OUT_DIR=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

summary="$OUT_DIR/gpu-throughput.md"
: > "$summary"
part() {  # part NAME SECONDS ARGS...: one bench run under a hard timeout; its table goes into the summary
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name ($(date -u +%H:%M:%S))"
  timeout --signal=INT "$limit" python3 bench/throughput.py --device cuda --json "$OUT_DIR/$name.json" "$@" \
    | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  { echo "### $name (exit $rc)"; echo; sed -n '/^| configuration/,$p' "$OUT_DIR/$name.log"; echo; } >> "$summary"
}

# The bar first (compiled plain PyTorch, all heads' logits kept), then ds-mtp's chunked loss.
part gpt2-plain 150 --shape gpt2 --steps 10 --warmup 3 --budget-s 115 \
  --configs plain-ntp+compile,plain-lse4+compile,ntp,lse4-linear,lse4-linear+compile,ntp+compile,lse4-linear:materialized,plain-lse4,lse4-block,lse4-sequential
part gpt2-deepspeed 75 --shape gpt2 --engine deepspeed --zero-stage 1 --steps 10 --warmup 3 --budget-s 45 \
  --configs ntp,lse4-linear,lse4-linear+compile,ntp+compile
part paper-graph 50 --shape paper-graph --steps 20 --warmup 3 --budget-s 30 \
  --configs plain-ntp+compile,plain-lse4+compile,ntp,lse4-linear,lse4-linear:materialized,ntp+compile,lse4-linear+compile

echo; echo "=== loader ($(date -u +%H:%M:%S))"
{ echo "### loader, paper set-up (this machine's CPU)"; echo
  timeout 30 python3 bench/loader.py --seconds 2 | sed -n '/^| loader/,$p'; echo; } | tee -a "$summary"

echo; echo "=== summary ($(date -u +%Y-%m-%d), $(python3 -c 'import torch; print(torch.cuda.get_device_name())'))"
cat "$summary"
