"""DVC stage ``check_params``: validate params.yaml before DVC runs any other stage.

``dvc repro`` deletes a stage's outputs and runs its command through a shell before that command
can read a single param; a variant name is pasted into both (``models/${key}``, ``python -m stages
train ${key}``). Every other stage depends on this one's output, so DVC runs it first, and a params
file that :func:`pipeline.config.load_params` refuses (a variant named ``a/b`` or ``x;touch y``, an
output folder outside the project) stops the run before anything is deleted or executed.
"""

from __future__ import annotations

from pipeline.config import CHECKED_PARAMS, checked_params_record, load_params
from pipeline.io import write_json
from pipeline.runtime.cli import run_stage, stage_parser


def check_params(args) -> None:
    load_params(args.params)
    write_json(CHECKED_PARAMS, checked_params_record())  # the same bytes whatever the values: see its docstring
    print(f"check_params: {args.params} is valid")


def main(argv=None) -> None:
    run_stage(check_params, stage_parser("check_params", __doc__), argv)


if __name__ == "__main__":
    main()
