"""`pip install sparseclip` (no extra) gives the model, the objective, the metrics and the SAE.

The pipeline's packages (Ray, MLflow, DVC, pyarrow, the offline models: the `pipeline` extra in
pyproject.toml) are made absent in a fresh interpreter, as on a machine that never installed them,
and the core is imported and used there: a forward pass, the loss, a metric, an SAE step.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from .conftest import REPO

# Distribution names whose import name differs from the distribution's with - as _.
IMPORT_NAMES = {"scikit-learn": "sklearn", "open_clip_torch": "open_clip", "pyyaml": "yaml", "pillow": "PIL"}

CORE_USE = """
import importlib.abc, importlib.machinery, sys

class Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        raise ModuleNotFoundError(module.__name__)

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Absent())

sys.meta_path.insert(0, Block())

import numpy as np, scipy.sparse as sp, torch
from pipeline.clip.model import build_model
from pipeline.clip.loss import SparseClipObjective
from pipeline.config import MetricsParams, ModelParams
from pipeline.metrics.registry import Activations, compute
from pipeline.sae.model import SparseAutoencoder

params = ModelParams.model_validate({"inline": {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8,
    "width": 16, "layers": 1, "head_width": 8}, "text_cfg": {"context_length": 6, "vocab_size": 50, "width": 16,
    "layers": 1, "heads": 2}}, "expansion": 4})
model = build_model(params)
outputs = model(torch.randn(4, 3, 16, 16), torch.randint(1, 49, (4, 6)))
loss = SparseClipObjective(params)(outputs)["loss"]
loss.backward()
images = sp.csr_matrix(outputs["image_features"].detach().numpy())
print(compute("sparsity", Activations(images), MetricsParams())["l0"] >= 0)
sae = SparseAutoencoder(d_in=8, width=32, k=4)
print(sae(torch.randn(5, 8))[0].shape == (5, 8))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("leaked:", leaked)
"""


def pipeline_extra_imports() -> set[str]:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pipeline"]
    names = {re.split(r"[\[=<>~! ]", spec, maxsplit=1)[0] for spec in extra}
    return {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names}


def test_the_core_runs_without_the_pipeline_extra():
    blocked = pipeline_extra_imports()
    assert {"ray", "mlflow", "dvc", "pyarrow", "transformers"} <= blocked
    code = f"BLOCKED = {sorted(blocked)!r}\n" + CORE_USE
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == ["True", "True", "leaked: []"], done.stdout


def test_the_core_dependencies_name_none_of_the_pipelines():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[\[=<>~! ]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    assert not core & {"ray", "mlflow", "dvc", "pyarrow", "transformers"}, core
