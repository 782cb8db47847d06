# pretrain: one resolved run config per run id, then `cribo train` on it (torchrun when gpu > 1).
# The rule's output is summary.json, written last: checkpoint.pth is rewritten every epoch and is
# not a declared output, so a failed or killed job keeps it and the rerun resumes from it.


rule run_config:
    wildcard_constraints:
        run_id="|".join(TRAINED_IDS),
    output:
        f"{RUN_DIR}/pretrain/run.yaml",
    log:
        "logs/{experiment}/{run_id}/run_config.log",
    benchmark:
        "logs/benchmarks/{experiment}/{run_id}/run_config.tsv"
    params:
        cfg=lambda wc: RUNS[RUN_NAME[wc.run_id]],
    run:
        from cribo.config import write_run_config

        write_run_config(params.cfg, output[0])


rule pretrain:
    wildcard_constraints:
        run_id="|".join(TORCHRUN_IDS),
    input:
        data=pretrain_data_input,
        cfg=f"{RUN_DIR}/pretrain/run.yaml",
        correspondence=orl_correspondence_input,  # ORL runs: the stage-2 file (workflow/rules/orl.smk)
    output:
        f"{RUN_DIR}/pretrain/summary.json",
    log:
        "logs/{experiment}/{run_id}/pretrain.log",
    benchmark:
        "logs/benchmarks/{experiment}/{run_id}/pretrain.tsv"
    threads: lambda wc: min(workflow.cores, PRETRAIN_THREADS)
    # before evaluations, so the last minutes are not one core training alone; ORL's chain (stage-1
    # run, stage 2, stage-3 runs) first of all, as it is three jobs long
    priority: lambda wc: 30 if wc.run_id in ORL_CHAIN_IDS else 10
    resources:
        # processes (GPUs) of the run: the run's train.gpus_per_node, else 0 (one CPU process); the
        # SLURM profile's set-resources (gpu: 8) overrides it, -> sbatch --gpus=N, and `cribo train`
        # then relaunches itself under torchrun --standalone
        gpu=lambda wc: run_layout(wc)["resources"].get("gpu", 0),
    params:
        outdir=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "cribo train --config {input.cfg} --output-dir {params.outdir} --nproc-per-node {resources.gpu} "
        "--set train.threads={threads} --summary {output} > {log} 2>&1"


if SRUN_IDS:

    rule pretrain_srun:
        # runs whose train settings ask for several nodes (or launcher: srun): the job gets
        # train.nodes nodes with train.gpus_per_node GPUs (per-node gres) and one srun task per GPU
        # (cribo.train.launch_layout); no torchrun, `cribo train` reads SLURM_PROCID/NTASKS/LOCALID
        wildcard_constraints:
            run_id="|".join(SRUN_IDS),
        input:
            data=pretrain_data_input,
            cfg=f"{RUN_DIR}/pretrain/run.yaml",
            correspondence=orl_correspondence_input,
        output:
            f"{RUN_DIR}/pretrain/summary.json",
        log:
            "logs/{experiment}/{run_id}/pretrain.log",
        benchmark:
            "logs/benchmarks/{experiment}/{run_id}/pretrain.tsv"
        threads: 1  # torch threads per process (set-threads in the SLURM profile)
        resources:
            nodes=lambda wc: run_layout(wc)["resources"]["nodes"],
            tasks_per_node=lambda wc: run_layout(wc)["resources"]["tasks_per_node"],
            gres=lambda wc: run_layout(wc)["resources"].get("gres", ""),
            mpi="srun",
        params:
            outdir=lambda wc, output: os.path.dirname(output[0]),
        # the task geometry is spelt out: the plugin's job step strips the allocation's SLURM_* variables
        # (snakemake-executor-plugin-slurm-jobstep 0.6), and a bare `srun` would then start one task
        shell:
            "{resources.mpi} --nodes {resources.nodes} --ntasks-per-node {resources.tasks_per_node} "
            "--cpus-per-task {threads} cribo train --config {input.cfg} --output-dir {params.outdir} "
            "--set train.threads={threads} --summary {output} > {log} 2>&1"


if BASELINES:

    rule import_baseline:
        # pretrained weights (an official release, timm weights, an export) become a run's checkpoint
        wildcard_constraints:
            run_id="|".join(BASELINE_IDS),
        # a local file is an input; a catalogue checkpoint is fetched by the rule (resumable, verified)
        input:
            weights=lambda wc: ([] if BASELINES[RUN_NAME[wc.run_id]].get("catalogue")
                                else BASELINES[RUN_NAME[wc.run_id]]["weights"]),
            catalogue=lambda wc: CHECKPOINT_CATALOGUE if BASELINES[RUN_NAME[wc.run_id]].get("catalogue") else [],
        output:
            f"{RUN_DIR}/pretrain/summary.json",
        log:
            "logs/{experiment}/{run_id}/import_baseline.log",
        params:
            source=lambda wc: (f"--from-catalogue {BASELINES[RUN_NAME[wc.run_id]]['catalogue']} "
                               f"--catalogue {CHECKPOINT_CATALOGUE} --downloads {CHECKPOINT_DOWNLOADS}"
                               if BASELINES[RUN_NAME[wc.run_id]].get("catalogue")
                               else f"--weights {BASELINES[RUN_NAME[wc.run_id]]['weights']}"),
            outdir=lambda wc, output: os.path.dirname(output[0]),
            spec=lambda wc: BASELINES[RUN_NAME[wc.run_id]],
            timm=lambda wc: (f"--timm-model {BASELINES[RUN_NAME[wc.run_id]]['timm_model']}"
                             if BASELINES[RUN_NAME[wc.run_id]].get("timm_model") else ""),
            pretrain=lambda wc: (f"--pretrain-data {BASELINES[RUN_NAME[wc.run_id]]['pretrain']}"
                                 if BASELINES[RUN_NAME[wc.run_id]].get("pretrain") else ""),
        shell:
            "cribo import-baseline {params.source} {params.timm} --method {params.spec[method]} "
            "{params.pretrain} --output-dir {params.outdir} --summary {output} > {log} 2>&1"


rule training_curves:
    # the runs' loss per step side by side (one column per run), drawn by `dvc plots show`
    input:
        expand(f"results/{EXPERIMENT}/{{run_id}}/pretrain/summary.json", run_id=RUN_IDS.values()),
    output:
        tsv="results/tables/training_curves.tsv",
        png=report("results/tables/training_curves.png", caption="../report/training_curves.rst",
                   category="2. Pretraining"),
    log:
        "logs/tables/training_curves.log",
    params:
        runs=lambda wc, input: [f"{RUN_NAME[p.split('/')[2]]}={os.path.dirname(p)}" for p in input],
    shell:
        "cribo curves --runs {params.runs:q} --out {output.tsv} --png {output.png} > {log} 2>&1"
