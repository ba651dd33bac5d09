"""Typed, validated pipeline parameters, loaded from ``params.yaml``.

Every stage reads its configuration through :func:`load_params` and nothing else, so a typo in
``params.yaml`` fails before any work starts, with a message naming the key, the value and what
was expected. The same file drives the embedded CPU run and a multi-node GPU run: only values
change, never code.

The sections live by stage in :mod:`.base` (the strict section and the output-folder rules),
:mod:`.data`, :mod:`.training` and :mod:`.analysis`; everything is importable from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from pipeline.config.base import (  # noqa: F401  (re-exported)
    DEFAULT_PARAMS,
    OUTPUT_ROOTS_ENV,
    OutputDir,
    ParamsError,
    ProjectParams,
    RayParams,
    Section,
    SharedDir,
)
from pipeline.config.data import (  # noqa: F401  (re-exported)
    GeneratorParams,
    SampleParams,
    SourceParams,
    SplitParams,
)
from pipeline.config.training import (  # noqa: F401  (re-exported)
    LockParams,
    ModelParams,
    OptimParams,
    PAPER_VARIANTS,
    TINY_CLIP,
    TowerParams,
    TrainParams,
    VARIANT_NAME,
    VariantParams,
    WorkerGroupParams,
)
from pipeline.config.analysis import (  # noqa: F401  (re-exported)
    AblationParams,
    AtlasParams,
    ExtractParams,
    MetricsParams,
    ReferenceParams,
    ReportParams,
    SAEParams,
    SteerParams,
    VLMParams,
    VocabParams,
)


class Params(Section):
    project: ProjectParams = ProjectParams()
    ray: RayParams = RayParams()
    sample: SampleParams = SampleParams()
    train: TrainParams = TrainParams()
    vocab: VocabParams = VocabParams()
    reference: ReferenceParams = ReferenceParams()
    extract: ExtractParams = ExtractParams()
    metrics: MetricsParams = MetricsParams()
    sae: SAEParams = SAEParams()
    atlas: AtlasParams = AtlasParams()
    vlm: VLMParams = VLMParams()
    steer: SteerParams = SteerParams()
    report: ReportParams = ReportParams()
    ablation: AblationParams = AblationParams()

    @model_validator(mode="after")
    def _sae_source_is_a_variant(self) -> Params:
        if self.sae.source_variant not in self.train.variants:
            raise ValueError(f"sae.source_variant {self.sae.source_variant!r} is not one of train.variants "
                             f"({', '.join(self.train.variants)})")
        unknown = [v for v in [*(self.atlas.variants or []), *self.vlm.variants] if v not in self.train.variants]
        if unknown:
            raise ValueError(f"atlas/vlm variants {unknown} are not train.variants ({', '.join(self.train.variants)})")
        if self.steer.variant not in self.vlm.variants:
            raise ValueError(f"steer.variant {self.steer.variant!r} is not one of vlm.variants {self.vlm.variants}")
        if missing := [t for t in self.steer.question_types if t not in self.vlm.question_types]:
            raise ValueError(f"steer.question_types {missing} are not in vlm.question_types {self.vlm.question_types}: "
                             "the steered VLM is trained and asked only those")
        if self.steer.max_new_tokens <= self.vlm.max_new_tokens:
            raise ValueError(f"steer.max_new_tokens {self.steer.max_new_tokens} must exceed vlm.max_new_tokens "
                             f"{self.vlm.max_new_tokens}: answers cut at the normal length can never be abnormally "
                             "long, and the corruption rate would be 0 by construction")
        read = {"train": "train", "val": "train (validation)"} | {s: "extract.splits" for s in self.extract.splits}
        read |= {s: "sae.train_splits" for s in self.sae.train_splits if s not in read}
        empty = [f"{split} (read by {reader})" for split, reader in read.items() if self.sample.splits.as_dict()[split] == 0]
        if empty:
            raise ValueError(f"sample.splits gives fraction 0 to {', '.join(empty)}: the pipeline would sample "
                             "nothing there and fail later; give each a share")
        return self

    def atlas_variants(self) -> list[str]:
        return list(self.atlas.variants or self.train.variants)

    def section_hash(self, name: str) -> str:
        """Short content hash of one section, the 'DVC params hash' tagged on MLflow runs."""
        payload = json.dumps(getattr(self, name).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# The check_params stage's output, a dependency of every other DVC stage (stages/check_params.py).
CHECKED_PARAMS = Path("data/params_checked.json")


def checked_params_record() -> dict[str, str]:
    """What the check stage writes: constant, so that a params change reruns only the stages whose
    own params changed (DVC compares this file's hash, which stays the same), while a params file
    that does not validate stops ``dvc repro`` before any stage."""
    return {"checked_by": "pipeline.config.load_params",
            "meaning": "params.yaml validated before any other stage ran (variant names, output folders, values)"}


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; ``overrides`` maps dotted keys to values (for tests, CLIs).

    Raises :class:`ParamsError` naming the file, each bad key, its value and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "\n".join(f"  - {_describe(e)}" for e in err.errors())
        raise ParamsError(f"{path}: invalid params:\n{problems}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (the context, a caret drawing) as one line: what, and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or ' '.join(str(err).split())}{where}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _describe(error: dict) -> str:
    """One readable line per pydantic error: key, value, expectation."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(error["loc"][:-1])) or "none"
        return f"{key} = {error['input']!r}: unknown key; expected one of: {allowed}"
    value = error.get("input")
    value_text = "" if isinstance(value, dict) else f" = {value!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}{value_text}: {message}"


def _fields_at(loc: tuple) -> list[str]:
    """The field names a section accepts, found by walking the model classes along ``loc``."""
    model: Any = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))
