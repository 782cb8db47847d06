# Real datasets: download (archives fetched, verified, extracted into resources/raw/<archive>/) and
# prepare (masks, split lists, completion marker resources/<dataset>/.prepared.json). Not in the
# default target: they run when a config names a real dataset (dataset.name: voc, with
# dataset.root: resources/voc), or on request, e.g. `snakemake --cores 16 resources/voc/.prepared.json`.
# ImageNet and Cityscapes are user-provided: `resources/checked/<name>.json` checks the tree.
from cribo.data.registry import ARCHIVES, PREPARED

DATASETS_CFG = config.get("datasets", {})
RAW = DATASETS_CFG.get("raw", "resources/raw")
DOWNLOADS = DATASETS_CFG.get("downloads", "resources/downloads")
MIRROR = DATASETS_CFG.get("mirror")


wildcard_constraints:
    archive="|".join(ARCHIVES),
    dataset="|".join(PREPARED),
    user_dataset="imagenet|cityscapes",


rule download_archive:
    output:
        f"{RAW}/{{archive}}/.extracted",
    log:
        "logs/data/download-{archive}.log",
    benchmark:
        "logs/benchmarks/data/download-{archive}.tsv"
    params:
        mirror=f"--mirror {MIRROR}" if MIRROR else "",
    retries: 2
    shell:
        "cribo data download {wildcards.archive} --downloads {DOWNLOADS} --raw {RAW} {params.mirror} "
        "--no-progress > {log} 2>&1"


rule prepare_dataset:
    input:
        lambda wc: [f"{RAW}/{archive}/.extracted" for archive in PREPARED[wc.dataset]],
    output:
        "resources/{dataset}/.prepared.json",
    log:
        "logs/data/prepare-{dataset}.log",
    benchmark:
        "logs/benchmarks/data/prepare-{dataset}.tsv"
    threads: 16
    shell:
        "cribo data prepare {wildcards.dataset} --raw {RAW} --out resources/{wildcards.dataset} "
        "--workers {threads} --no-progress > {log} 2>&1"


rule check_user_dataset:
    output:
        "resources/checked/{user_dataset}.json",
    log:
        "logs/data/check-{user_dataset}.log",
    params:
        root=lambda wc: DATASETS_CFG.get("roots", {}).get(wc.user_dataset, f"resources/{wc.user_dataset}"),
    shell:
        "cribo data check {wildcards.user_dataset} --root {params.root} --out {output} > {log} 2>&1"
