#!/usr/bin/env bash
# The paper's set-up on one GPU (issue #14): `ds-mtp reproduce --scale paper` (6L/6H/d=120, batch 1024 padded paths,
# 20k steps, lr 5e-4 cosine, bf16) on the USG world, for as many methods as fit BUDGET seconds (default 420, so
# the whole call stays under 8 minutes of device time). LSE-MTP first, then NTP, then MTP: the paper's headline
# comparison is LSE-MTP against NTP. A run cut by the budget keeps its checkpoints (train.save_every=2000);
# the same command with --resume continues it.
#
# Once, on the CPU machine, from the repository root with the project's .venv active (the GPU machine has no
# network, and lacks deepspeed, hjson, pydantic and PyYAML):
#     echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"; ../shared/gpu/wheels.sh pyyaml
# Then through the device tool with carry [".whl"]:   bash bench/gpu_paper.sh
# It prints each run's progress, then report.md (or the metrics rows reached); with $OUT set, the output
# directory's report, results.json and metrics land there.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-420}
source bench/gpu_env.sh
OUT_DIR=${OUT:-/tmp/gpu-paper}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
started=$(date +%s)
timeout --signal=INT "$BUDGET" python3 -m ds_mtp.cli reproduce --world usg --scale paper --seeds 1 \
  --methods lse-mtp,ntp,mtp --nproc 1 --out "$OUT_DIR/usg-paper"
rc=$?
echo "=== reproduce exit $rc after $(( $(date +%s) - started )) s (budget $BUDGET s)"
if [ -f "$OUT_DIR/usg-paper/report.md" ]; then
  cat "$OUT_DIR/usg-paper/report.md"
else  # cut by the budget: the held-out curve of every run so far
  for m in "$OUT_DIR"/usg-paper/runs/*/metrics.jsonl; do
    echo "--- $m"; grep eval_ce_1 "$m" | python3 -c 'import json,sys
for line in sys.stdin:
    r = json.loads(line); print(r["step"], "ce_1", round(r["ce_1"], 4), "eval_ce_1", r["eval_ce_1"], "tokens/s", round(r["tokens_per_s"]))'
  done
fi
