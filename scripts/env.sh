# Sourced by the Makefile and .ci/run: keep every tool offline and quiet.
# Only loopback traffic is allowed on this project's machines; these switch off the
# telemetry and hub look-ups that MLflow, DVC, Ray and Hugging Face would otherwise attempt.
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1
export DVC_NO_ANALYTICS=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
