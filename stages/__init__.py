"""One thin entry point per DVC stage: parse params, call :mod:`pipeline`, log to MLflow."""
