"""Where a comparison's numbers come from: MLflow runs (the latest per stage and variant, given
run ids, or the runs of named DVC experiments), and, for experiments whose metrics files Git
tracks, ``dvc exp show``.

Every source is turned into :class:`Model` rows: one per model (a variant, or the SAE baseline)
with the metrics of each stage that measured it, its training curves and its model params. Stage
runs map to models by their ``stage``/``variant`` tags: ``train`` and ``metrics`` (Tab 1-3a),
``sae``, ``atlas`` (keys ``<variant>.*``), ``vlm`` (``qa.*``) and ``steer``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.io import flatten

# Training curves kept per train run: sparsity, zero-shot during training, loss.
CURVE_PREFIXES = ("train/l0_image_pct", "train/l0_text_pct", "train/loss", "train/dead_fraction",
                  "train/logit_scale", "zeroshot/", "val/")
SKIPPED_STAGES = {"report", "sample", "vocab", "reference", "extract"}
SAE = "sae"
SAE_KINDS = ("multimodal", "cls", "residual")  # the SAE stage's other SAEs, keys <kind>.*
UNKNOWN_RUN = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # MLflow's codes for a bad run id


@dataclass
class Model:
    """One model's results in one source: a row of every table that has its numbers."""

    source: str
    name: str
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.source} / {self.name}" if self.source else self.name

    def value(self, stage: str, key: str) -> float | None:
        return self.stages.get(stage, {}).get(key)


@dataclass
class Comparison:
    """The models compared, in order, and the params that differ between the sources."""

    models: list[Model]
    sources: list[str]
    params_diff: dict[str, dict[str, str]] = field(default_factory=dict)

    def run_ids(self) -> list[str]:
        return sorted({run_id for m in self.models for run_id in m.run_ids.values()})


# --------------------------------------------------------------------------- MLflow


def latest_runs(client: MlflowClient, experiment: str, tags: Mapping[str, str] | None = None) -> list[Run]:
    """The latest FINISHED run of each stage + variant of an experiment (report runs excluded),
    among the runs carrying ``tags``. Tags are compared here, not in MLflow's filter string: its
    quoted values have no escape, and a DVC experiment's name may hold either quote."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    latest: dict[tuple[str, str], Run] = {}
    token = None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        for run in page:
            key = (run.data.tags.get("stage", ""), run.data.tags.get("variant", ""))
            if key[0] and key[0] not in SKIPPED_STAGES and tags_match(run, tags or {}):
                latest.setdefault(key, run)
        token = page.token
        if not token:
            return list(latest.values())


def tags_match(run: Run, tags: Mapping[str, str]) -> bool:
    return all(run.data.tags.get(key) == value for key, value in tags.items())


def models_from_runs(client: MlflowClient, runs: Iterable[Run], source: str = "") -> list[Model]:
    """Rows from stage runs; a second run of the same stage and model becomes its own row."""
    models: dict[tuple[str, str], Model] = {}
    for run in runs:
        stage, variant = run.data.tags.get("stage", ""), run.data.tags.get("variant", "")
        for name, metrics in _split_by_model(stage, variant, run.data.metrics).items():
            key = (source, name)
            if stage in models.get(key, Model(source, name)).stages:  # e.g. two given train runs of one variant
                key = (f"{source or 'run'} {run.info.run_id[:8]}".strip(), name)
            model = models.setdefault(key, Model(key[0], name))
            _add(model, stage, metrics, run.info.run_id)
            if stage == "train":
                model.params.update({k: v for k, v in run.data.params.items() if k.startswith(("model.", "optim."))})
                model.curves.update(_curves(client, run))
            if stage == "metrics":  # which encoder judged Clarity
                model.params.update({k: v for k, v in run.data.params.items() if k.startswith("reference.")})
    return list(models.values())


def _split_by_model(stage: str, variant: str, metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """A run's metrics by the model they describe (the atlas run describes every variant)."""
    if stage == "atlas":
        per_model: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            name, _, rest = key.partition(".")
            per_model.setdefault(name, {})[rest] = value
        return per_model
    if stage == "sae":  # the image SAE at the top level, the other SAEs under their name
        per_model = {SAE: {}}
        for key, value in metrics.items():
            name, _, rest = key.partition(".")
            if name in SAE_KINDS:
                per_model.setdefault(f"{SAE}_{name}", {})[rest] = value
            else:
                per_model[SAE][key] = value
        return per_model
    if stage == "train":
        return {variant: {k.replace("/", "."): v for k, v in metrics.items()}}
    return {variant: dict(metrics)} if variant else {}


def _add(model: Model, stage: str, metrics: Mapping[str, float], run_id: str | None) -> None:
    model.stages[stage] = dict(metrics)
    if stage == "sae":  # the SAE's L0, Clarity, ... sit beside the variants' in Tab 3a
        model.stages["metrics"] = dict(metrics)
    if run_id:
        model.run_ids[stage] = run_id


def _curves(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                     key=lambda m: m.step)]
            for key in run.data.metrics if key.startswith(CURVE_PREFIXES)}


# --------------------------------------------------------------------------- metrics files (dvc exp show)


def models_from_metric_files(files: Mapping[str, Mapping], source: str, steer_variant: str = "sparse_plus") -> list[Model]:
    """Rows from the pipeline's metrics files, as ``dvc exp show --json`` reports them."""
    models: dict[str, Model] = {}

    def add(name: str, stage: str, metrics: Mapping) -> None:
        numbers = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        _add(models.setdefault(name, Model(source, name)), stage, numbers, None)

    for path, metrics in files.items():
        parts = Path(path).with_suffix("").parts
        if parts[:2] == ("metrics", "train") and len(parts) == 3:
            add(parts[2], "train", metrics)
        elif parts == ("metrics", "sae"):
            for name, numbers in _split_by_model("sae", "", flatten(metrics)).items():
                add(name, "sae", numbers)
        elif parts == ("metrics", "atlas"):
            for name, numbers in _split_by_model("atlas", "", flatten(metrics)).items():
                add(name, "atlas", numbers)
        elif parts == ("metrics", "vlm"):
            for name, numbers in metrics.items():
                add(name, "vlm", {f"qa.{k}": v for k, v in flatten(numbers).items()})
        elif parts == ("metrics", "steering"):
            add(steer_variant, "steer", metrics)
        elif len(parts) == 2 and parts[0] == "metrics" and parts[1] != "sample":
            add(parts[1], "metrics", metrics)
    return list(models.values())


def dvc_exp_show(repo: str | Path = ".") -> list[dict]:
    """``dvc exp show --json``, flattened to one record per commit or experiment: name, rev,
    params (dotted) and the metrics files it could read."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"`dvc exp show --json` failed in {repo}: {done.stderr.strip()[-500:]}")
    records = []
    for entry in json.loads(done.stdout[done.stdout.index("["):]):
        for item in [entry, *(rev for exp in entry.get("experiments") or [] for rev in exp.get("revs", []))]:
            data = item.get("data") or {}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = {path: m["data"] for path, m in (data.get("metrics") or {}).items() if "data" in m}
            records.append({"name": item.get("name") or item.get("rev"), "rev": item.get("rev"),
                            "params": flatten(params), "metrics": metrics})
    return records


# --------------------------------------------------------------------------- the three ways to choose


def from_experiment(client: MlflowClient, experiment: str) -> Comparison:
    """The latest FINISHED run of every stage and variant of one MLflow experiment."""
    if client.get_experiment_by_name(experiment) is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment named {experiment!r} in {client.tracking_uri} "
                         f"(known: {', '.join(known) or 'none'})")
    return Comparison(_ordered(models_from_runs(client, latest_runs(client, experiment))), [experiment])


def from_run_ids(client: MlflowClient, run_ids: Iterable[str]) -> Comparison:
    """Exactly the runs given (any experiment)."""
    return Comparison(_ordered(models_from_runs(client, [_get_run(client, r) for r in run_ids])), ["runs"])


def _get_run(client: MlflowClient, run_id: str) -> Run:
    """A given run; an id the store does not know is the user's typo, said in one line (MLflow's
    own error is a traceback through the store)."""
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code not in UNKNOWN_RUN:
            raise
        raise ValueError(f"no MLflow run with id {run_id!r} in {client.tracking_uri}") from None


def from_dvc_exps(client: MlflowClient, experiment: str, names: list[str], repo: str | Path = ".") -> Comparison:
    """Named DVC experiments: their stage runs (tagged ``dvc_exp`` by every stage), or, where an
    experiment has none, the metrics files ``dvc exp show`` reads; plus the params that differ."""
    records = {r["name"]: r for r in dvc_exp_show(repo)}
    records.update({r["rev"]: r for r in records.values() if r["rev"]})
    models: list[Model] = []
    for name in names:
        runs = latest_runs(client, experiment, {"dvc_exp": name})
        found = models_from_runs(client, runs, name)
        if not found and name in records:
            found = models_from_metric_files(records[name]["metrics"], name,
                                             records[name]["params"].get("steer.variant", "sparse_plus"))
        if not found and name not in records:
            raise ValueError(f"no DVC experiment or MLflow runs named {name!r} (see `dvc exp show`)")
        models.extend(found)
    return Comparison(_ordered(models, names), names, _params_diff({n: records[n]["params"] for n in names
                                                                  if n in records}))


def _params_diff(params: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, str]]:
    keys = sorted({k for values in params.values() for k in values})
    diff = {}
    for key in keys:
        values = {name: json.dumps(p.get(key)) if isinstance(p.get(key), (list, dict)) else str(p.get(key, "–"))
                  for name, p in params.items()}
        if len(set(values.values())) > 1:
            diff[key] = values
    return diff


def _ordered(models: list[Model], sources: list[str] | None = None) -> list[Model]:
    """Source by source; within one, the dense baseline, the SAE, then the sparse variants."""
    rank = {s: i for i, s in enumerate(sources or [])}
    first = {"dense": 0, SAE: 1}
    return sorted(models, key=lambda m: (rank.get(m.source, len(rank)), m.source, first.get(m.name, 2), m.name))
