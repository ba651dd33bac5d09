"""``python -m pipeline.report``: the comparison report from the command line (the ``report``
stage with its sources given as options: ``--runs``, ``--experiment``, ``--dvc-exps``)."""

from stages.report import main

main()
