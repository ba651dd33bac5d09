"""How a stage runs, not what it computes: the Ray cluster it joins, Ray Train's driver and torch's
process group, the warm-stage server, job submission, MLflow tracking and the stages' CLI glue.

The computation packages (``clip``, ``data``, ``activations``, ``metrics``, ``sae``, ``atlas``, ``vlm``,
``report``) never need this package to be used from Python; the stages combine the two.
"""
