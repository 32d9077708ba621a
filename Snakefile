# The flatness study as a DAG: prepare -> fid-reference -> train -> quantize -> sample -> fid,
# train -> metrics, and everything -> report. Rules only name inputs, outputs, params and
# resources; the science is in `python -m pipeline <stage>`.
#
#   snakemake --cores all --configfile config/demo.yaml   # offline demo on the CPU, minutes
#   snakemake --cores all                                  # the paper, on a GPU machine
#   snakemake --profile profiles/slurm                     # the paper, on a SLURM cluster

import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from pipeline.launch.control import ForkServer
from pipeline.settings import planning_problems, size_warnings

min_version("9.0")


configfile: "config.yaml"


# `snakemake --report report.html`: this text opens the report, the captions are beside it.
report: "workflow/report/workflow.rst"


envvars:
    "PATH",


# Duplicate keys in the loaded files, NaN/infinities, workflow/schemas/config.schema.yaml and the
# cross-checks, each problem one line (snakemake's validate() would dump the whole schema).
_problems = planning_problems(config, workflow.configfiles)
if _problems:
    raise WorkflowError("invalid config:\n  - " + "\n  - ".join(_problems))
# An absurd but valid size (training.steps: 10000000) is said before any job starts.
for _warning in size_warnings(config):
    print(f"warning: {_warning}", file=sys.stderr)


# Local runs fork each job from one process that imported torch and the stages once
# (pipeline/launch); cluster jobs stay processes of their own. PIPELINE_FORK_SERVER=off: no server.
FORK_SERVER = ForkServer()


onstart:
    FORK_SERVER.start(local=workflow.local_exec and workflow.is_main_process)


onsuccess:
    FORK_SERVER.stop()


onerror:
    FORK_SERVER.stop()


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        report_outputs(),
