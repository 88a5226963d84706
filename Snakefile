# trimkv: the TRIM-KV paper end to end. `snakemake` runs the offline preset (config/config.yaml);
# `snakemake --configfile config/paper.yaml --profile profiles/slurm` runs the paper on a GPU cluster.

import os

# the conda envs install trimkv from this checkout (envs/*.yaml: -e ${TRIMKV_ROOT})
os.environ.update(TRIMKV_ROOT=workflow.basedir)  # set, not read: no envvars directive


if not config:  # --configfile replaces the default preset instead of merging into it

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/tracking.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        all_outputs(),
