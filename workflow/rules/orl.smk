# ORL stage 2 (correspondence discovery) between the stage-1 BYOL run and the ORL runs: kNN of the
# images, then selective search, RoI embeddings and RoI pairs per image range (wildcard `shard`,
# one job each: a SLURM array on a cluster), merged into one correspondence file that the ORL
# runs' pretrain rule waits for. Every step is a `cribo orl` command writing atomically.
import json

from cribo.config import orl_stage2_dir, orl_stage2_settings

ORL_STAGE2 = orl_stage2_settings(config)
ORL_RUNS = [n for n, c in RUNS.items() if c["method"] == "orl"]
ORL_STAGE1_ID = RUN_IDS.get(ORL_STAGE2["stage1"])
ORL_DIR = orl_stage2_dir(config, ORL_STAGE1_ID) if ORL_RUNS and ORL_STAGE1_ID else None
ORL_SHARDS = list(range(ORL_STAGE2["shards"]))
# the pretrainings of ORL's chain (scheduled ahead of the others, rule pretrain)
ORL_CHAIN_IDS = ([ORL_STAGE1_ID] if ORL_DIR else []) + [RUN_IDS[n] for n in ORL_RUNS]


def orl_correspondence_input(wildcards):
    """An ORL run's pretraining waits for its correspondence file (other runs: nothing)."""
    cfg = RUNS[RUN_NAME[wildcards.run_id]]
    return [cfg["orl"]["correspondence"]] if cfg["method"] == "orl" else []


if ORL_DIR:
    ORL_STAGE1 = f"results/{EXPERIMENT}/{ORL_STAGE1_ID}/pretrain"

    rule orl_knn:
        # stage 2 sits between two pretrainings: ahead of everything, so ORL's stage 3 is not left to the end
        priority: 20
        input:
            f"{ORL_STAGE1}/summary.json",
        output:
            f"{ORL_DIR}/knn.npz",
        log:
            f"logs/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_knn.log",
        benchmark:
            f"logs/benchmarks/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_knn.tsv"
        params:
            k=ORL_STAGE2["k"],
        shell:
            "cribo orl knn --checkpoint " + ORL_STAGE1 + "/checkpoint.pth --k {params.k} --out {output} > {log} 2>&1"

    rule orl_proposals:
        priority: 20
        input:
            f"{ORL_DIR}/knn.npz",
        output:
            f"{ORL_DIR}/proposals-{{shard}}.npz",
        log:
            f"logs/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_proposals-{{shard}}.log",
        benchmark:
            f"logs/benchmarks/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_proposals-{{shard}}.tsv"
        wildcard_constraints:
            shard="[0-9]+",
        params:
            n=len(ORL_SHARDS),
            s=ORL_STAGE2,
        shell:
            "cribo orl proposals --knn {input} --shard {wildcards.shard} --num-shards {params.n} "
            "--min-size {params.s[min_size]} --max-aspect-ratio {params.s[max_aspect_ratio]} "
            "--max-iou {params.s[max_iou]} --top-n {params.s[top_n]} --out {output} > {log} 2>&1"

    rule orl_roi_embed:
        priority: 20
        input:
            knn=f"{ORL_DIR}/knn.npz",
            proposals=f"{ORL_DIR}/proposals-{{shard}}.npz",
        output:
            f"{ORL_DIR}/rois-{{shard}}.npy",
        log:
            f"logs/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_roi_embed-{{shard}}.log",
        benchmark:
            f"logs/benchmarks/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_roi_embed-{{shard}}.tsv"
        wildcard_constraints:
            shard="[0-9]+",
        shell:
            "cribo orl roi-embed --checkpoint " + ORL_STAGE1 + "/checkpoint.pth --knn {input.knn} "
            "--proposals {input.proposals} --out {output} > {log} 2>&1"

    rule orl_pairs:
        priority: 20
        input:
            knn=f"{ORL_DIR}/knn.npz",
            proposals=expand(f"{ORL_DIR}/proposals-{{shard}}.npz", shard=ORL_SHARDS),
            rois=expand(f"{ORL_DIR}/rois-{{shard}}.npy", shard=ORL_SHARDS),
        output:
            f"{ORL_DIR}/pairs-{{shard}}.npz",
        log:
            f"logs/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_pairs-{{shard}}.log",
        benchmark:
            f"logs/benchmarks/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_pairs-{{shard}}.tsv"
        wildcard_constraints:
            shard="[0-9]+",
        params:
            n=len(ORL_SHARDS),
            ratio=ORL_STAGE2["pair_ratio"],
        shell:
            "cribo orl pairs --knn {input.knn} --proposals {input.proposals} --rois {input.rois} "
            "--shard {wildcards.shard} --num-shards {params.n} --ratio {params.ratio} --out {output} > {log} 2>&1"

    rule orl_correspondence:
        priority: 20
        input:
            knn=f"{ORL_DIR}/knn.npz",
            proposals=expand(f"{ORL_DIR}/proposals-{{shard}}.npz", shard=ORL_SHARDS),
            pairs=expand(f"{ORL_DIR}/pairs-{{shard}}.npz", shard=ORL_SHARDS),
        output:
            corr=f"{ORL_DIR}/correspondence.npz",
            summary=report(f"{ORL_DIR}/summary.json", caption="../report/orl_stage2.rst", category="2. Pretraining"),
            figure=report(f"{ORL_DIR}/pairs.png", caption="../report/orl_pairs.rst", category="2. Pretraining"),
        log:
            f"logs/{EXPERIMENT}/{ORL_STAGE1_ID}/orl_correspondence.log",
        params:
            settings=lambda wc: json.dumps({k: v for k, v in ORL_STAGE2.items() if k != "shards"}),
        shell:
            "cribo orl merge --knn {input.knn} --proposals {input.proposals} --pairs {input.pairs} "
            "--settings {params.settings:q} --out {output.corr} --summary {output.summary} "
            "--figure {output.figure} > {log} 2>&1"
