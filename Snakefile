# The single entry point of the pipeline:
#   download -> pretrain -> extract -> eval_incontext -> table (+ training curves, figures)
# Run `snakemake --cores all` (embedded default), or `--configfile config/<other>.yaml`.
from snakemake.utils import min_version

from cribo.config import validate_workflow_config

min_version("9.19")


configfile: "config/config.yaml"


# one line naming the key and the file that sets it (Snakemake's validate dumps the whole schema)
validate_workflow_config(config, "workflow/schemas/config.schema.yaml",
                         ["config/config.yaml", *map(str, workflow.overwrite_configfiles)])


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/orl.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/svm.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/detect.smk"
include: "workflow/rules/tables.smk"


# seconds of work each: not worth a cluster job (and its scheduling latency) under --executor slurm
localrules:
    all,
    run_config,
    table,
    training_curves,


rule all:
    default_target: True
    input:
        rules.table.output,
        rules.training_curves.output,
        expand(f"results/{EXPERIMENT}/{{run_id}}/figures/{INCONTEXT_ID}", run_id=RUN_IDS.values())
        if config["evaluate"]["figures"] else [],
