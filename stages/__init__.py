"""One thin entry point per DVC stage: parse params, call :mod:`pipeline`, log to MLflow."""

# Every stage, in pipeline order: ``python -m stages NAME [args]`` runs ``stages/NAME.py``.
STAGES = ("check_params", "sample", "tower_cache", "train", "vocab", "reference", "extract", "metrics", "sae",
          "atlas", "vlm", "steer", "report", "ablation")
# Imported by the stages inside functions, so not by importing them: the warm-stage server
# (pipeline.runtime.stage_server) imports them up front too; found with SPARSECLIP_STAGE_SERVER_TRACE.
LAZY_IMPORTS = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.db.utils", "ray.data", "ray.train.torch",
                "sentence_transformers", "wordfreq")
