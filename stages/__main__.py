"""``python -m stages <stage> [args]``: run one DVC stage (``python -m stages.<stage>`` also works).

Under ``make pipeline`` the stage forks from a process that has imported the stages' code already
(:mod:`pipeline.runtime.stage_server`, through :mod:`pipeline.runtime.stage_client`); anywhere else it runs in this process. Either way it is the same
stage, run on the same code.
"""

import sys

from pipeline.runtime.stage_client import run_stage_command

sys.exit(run_stage_command(sys.argv[1:], package="stages"))
