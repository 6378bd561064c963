#!/usr/bin/env bash
# One command for one GPU (H100 class; at most ~8 minutes): the fused-attention equality tests on the
# GPU (cuDNN against the XLA path; splash in Pallas interpret mode), then the 3B-class train-step MFU
# benchmark with cuDNN attention and with the XLA attention, all written to one JSON.
#
#   benchmarks/gpu_check.sh [--out FILE.json]     # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run             # anywhere: CPU, the tiny config, cuDNN tests skipped
#
# Each part has its own time limit and records its exit status; a failed part does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=benchmarks/gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out FILE.json]" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d)
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BENCH=(--config configs/tiny.py --batch 4 --seq 192 --steps 2 --generate 0 --mesh 1,1,1)
  IMPLS=(auto xla)          # no cuDNN on a CPU: auto is today's CPU path
  T_TEST=300; T_BENCH=300
else
  export JAX_PLATFORMS=cuda,cpu
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
  # 3B-class: Phi-3.5-mini layers (12 of 32: fp32 Adam state of the whole model fits 80 GB), the real
  # SigLIP tower, 4 x 2048 tokens, bf16, weight matmuls saved (no recompute of them).
  BENCH=(--config configs/fusion_3b_phi35_stage1.py --batch 4 --seq 2048 --query-len 144 --llm-layers 12
         --remat dots_no_batch --vision-remat dots_no_batch --steps 5 --generate 0 --mesh 1,1,1 --chip h100)
  IMPLS=(cudnn xla)
  T_TEST=150; T_BENCH=150
fi

timeout "$T_TEST" python -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py \
  --junitxml="$TMP/junit.xml" > "$TMP/tests.log" 2>&1
echo "$?" > "$TMP/tests.rc"
tail -3 "$TMP/tests.log"

for impl in "${IMPLS[@]}"; do
  timeout "$T_BENCH" python benchmarks/bench_train_step.py "${BENCH[@]}" --attention "$impl" \
    --json "$TMP/bench_$impl.json" > "$TMP/bench_$impl.log" 2>&1
  echo "$?" > "$TMP/bench_$impl.rc"
  tail -1 "$TMP/bench_$impl.log"
done

python - "$TMP" "$OUT" "$DRY" "$START" "${IMPLS[@]}" <<'EOF'
import json, os, sys, time
import xml.etree.ElementTree as ET
tmp, out, dry, start, impls = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5:]

def read(name, default=None):
    try:
        with open(os.path.join(tmp, name)) as f:
            return f.read()
    except OSError:
        return default

res = {"dry_run": dry, "tests": {"rc": int(read("tests.rc", "-1"))}, "bench": {}}
try:
    suite = ET.parse(os.path.join(tmp, "junit.xml")).getroot().find("testsuite")
    res["tests"].update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
except (OSError, ET.ParseError, AttributeError):
    res["tests"]["log_tail"] = (read("tests.log", "") or "")[-2000:]
for impl in impls:
    r = {"rc": int(read(f"bench_{impl}.rc", "-1"))}
    data = read(f"bench_{impl}.json")
    if data:
        r.update(json.loads(data))
    else:
        r["log_tail"] = (read(f"bench_{impl}.log", "") or "")[-2000:]
    res["bench"][impl] = r
if all(res["bench"][i].get("mfu") for i in impls):
    res["mfu_ratio"] = res["bench"][impls[0]]["mfu"] / res["bench"][impls[1]]["mfu"]
res["wall_s"] = round(time.time() - start, 1)
with open(out, "w") as f:
    json.dump(res, f, indent=2, default=str)
print(f"wrote {out}: tests rc {res['tests']['rc']}, " + ", ".join(
    f"{i}: step {res['bench'][i].get('step_s_median', float('nan')):.3f} s, MFU {res['bench'][i].get('mfu')}"
    for i in impls) + f", {res['wall_s']} s")
EOF
