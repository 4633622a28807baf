#!/usr/bin/env bash
# The prepared GPU check (issue 14): everything a lent GPU should measure, in one go, under 9 minutes
# on one H100/H200. Each part has its own time budget (timeout), so one slow or failing part never
# costs the others; a part's JSON is rewritten after every variant (a killed part keeps what ended).
#
#   bench/gpu_check.sh --fetch-wheels        # here (network): wheels the GPU image lacks -> .whl/
#   bench/gpu_check.sh [--out DIR]           # on the GPU machine (carry .whl): the check itself
#   bench/gpu_check.sh --cpu [--out DIR]     # the same script end to end on the tiny models, < 2 min
#
# Parts (GPU budget, seconds): pytest -m gpu (95); stock diffusers vs k5serve, full-size random
# weights at 768x512x61 with reduced steps, per step and end to end: Lite distilled (75), Lite sft
# with the CFG-batching / compile / negative-cache / attention ablations (150); Pro sft per step
# and measured peak memory in memory mode gpu (90) and stream (90), each next to the plan's
# estimate; fp8 compute against bf16, one Lite and one Pro layer of each converted kind (20). 520 s
# of parts + ~15 s of wheel installs.
# Output: DIR/<part>.json (bench/generate.py reports), DIR/<part>.log, DIR/gpu_check.json (parts:
# rc, seconds, budget) and DIR/RESULTS_rows.md (bench/gpu_rows.py: rows for bench/RESULTS.md).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_check_out}"
CPU=0
FETCH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --out) OUT="$2"; shift ;;
        --fetch-wheels) FETCH=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && [ "$CPU" = 1 ]; then PY="$ROOT/.venv/bin/python"; fi

# What the GPU image lacks (/work/.library/device/KINDS.md lists what it has: torch, transformers,
# accelerate, numpy, pillow, pytest ...): the versions k5serve is tested with, except imageio-ffmpeg
# 0.5.1 (its ffmpeg is 26 MiB; 0.8's is 65 MiB, over the 64 MiB a device call carries): ~37 MiB in all.
WHEELS="diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 annotated-doc==0.0.7
typing-inspection==0.4.5 python-multipart==0.0.34 uvicorn==0.54.0 imageio-ffmpeg==0.5.1
importlib_metadata==10.2.0 opentelemetry-api==1.45.2"

if [ "$FETCH" = 1 ]; then
    mkdir -p "$ROOT/.whl"
    exclude="$(git -C "$ROOT" rev-parse --git-path info/exclude 2>/dev/null)"  # never committed
    [ -n "$exclude" ] && { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"; }
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux2010_x86_64 --platform any -d "$ROOT/.whl" $WHEELS || exit 1
    du -sh "$ROOT/.whl"
    exit 0
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$CPU" = 0 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/k5site \
        "$ROOT"/.whl/*.whl || exit 1
    export PYTHONPATH="/tmp/k5site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
cd "$ROOT" || exit 1

: > "$OUT/parts.tsv"
part() {  # part NAME BUDGET_S COMMAND...: run with a time limit, log, record rc and seconds
    local name=$1 budget=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (budget ${budget}s): $*"
    timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$budget" >>"$OUT/parts.tsv"
    echo "   rc $rc in $((SECONDS - t0))s"
}

GEN=("$PY" bench/generate.py)
if [ "$CPU" = 1 ]; then
    # The tiny models on the CPU: the same parts and outputs, small sizes (proves the script works).
    # Budgets here only catch a hang (~15 s a part on an idle 2-core machine; a loaded one is slower).
    B="${CPU_PART_BUDGET:-300}"
    TINY=(--variants kandinsky5-tiny-t2v --width 64 --height 64 --frames 9 --steps 2 --runs 1)
    part pytest "$B" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu
    part lite_distilled "$B" "${GEN[@]}" "${TINY[@]}" --guidance 1.0 --out "$OUT/lite_distilled.json"
    part lite_sft "$B" "${GEN[@]}" "${TINY[@]}" --ablate --out "$OUT/lite_sft.json"
    part pro_gpu "$B" "${GEN[@]}" "${TINY[@]}" --memory-mode gpu --skip-stock --out "$OUT/pro_gpu.json"
    part pro_stream "$B" "${GEN[@]}" "${TINY[@]}" --memory-mode stream --skip-stock --out "$OUT/pro_stream.json"
    part fp8_compute "$B" "$PY" bench/fp8_compute.py --cpu --out "$OUT/fp8_compute.json"
else
    FULL=(--full --frames-full 61 --runs 1)
    part pytest 95 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu
    part lite_distilled 75 "${GEN[@]}" "${FULL[@]}" --variants lite-distilled --steps-full 4 \
        --out "$OUT/lite_distilled.json"
    part lite_sft 150 "${GEN[@]}" "${FULL[@]}" --variants lite-sft --steps-full 4 --ablate --out "$OUT/lite_sft.json"
    # Pro: k5serve only (stock Pro's eager FlexAttention does not fit), blocks eager to save the
    # compile warm-up (the compile ablation is Lite's); per step and peak memory in both modes.
    part pro_gpu 90 "${GEN[@]}" "${FULL[@]}" --variants pro-sft --steps-full 2 --skip-stock --no-compile \
        --memory-mode gpu --out "$OUT/pro_gpu.json"
    part pro_stream 90 "${GEN[@]}" "${FULL[@]}" --variants pro-sft --steps-full 2 --skip-stock --no-compile \
        --memory-mode stream --out "$OUT/pro_stream.json"
    # fp8 compute (sm_89+; an older card writes why it skipped): layer times and error vs bf16
    part fp8_compute 20 "$PY" bench/fp8_compute.py --out "$OUT/fp8_compute.json"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
parts = []
for line in (out / "parts.tsv").read_text().splitlines():
    name, rc, seconds, budget = line.split("\t")
    log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
    parts.append({"name": name, "rc": int(rc), "seconds": int(seconds), "budget_s": int(budget),
                  "tail": log[-1] if log else ""})
(out / "gpu_check.json").write_text(json.dumps({"parts": parts}, indent=2) + "\n")
EOF
"$PY" bench/gpu_rows.py "$OUT" >"$OUT/RESULTS_rows.md"
cat "$OUT/RESULTS_rows.md"
# exit status: the first failing part's (0 when every part passed)
awk -F'\t' '$2 != 0 { print $2; exit }' "$OUT/parts.tsv" | { read -r rc && exit "$rc"; exit 0; }
