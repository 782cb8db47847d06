# ImageNet-style classification (ORL's linear and semi-supervised protocols) of every run, or of
# evaluate.classify.runs, when evaluate.classify.enabled: one row for the linear probe on frozen
# features; for semi-supervised fine-tuning, one row per subset list and point of the
# (lr, head_lr_mult) grid (the paper tables take the best point, see cribo.results.paper). On the
# toy, the classification view of the toy scenes (one label per image) is linked into its own
# folder first.


rule toy_image_folder:
    input:
        DATA_INPUT,
    output:
        f"{CLASSIFY_ROOT}/.prepared.json",
    log:
        "logs/data/toy-folder.log",
    params:
        root=CLASSIFY_ROOT,
        percents=lambda wc: " ".join(s.removesuffix("percent") for s in CLASSIFY_SUBSETS.values()
                                     if is_percent_list(s)) or "10",
    shell:
        "cribo data toy-folder --toy-root {input} --out {params.root} --percents {params.percents} > {log} 2>&1"


rule eval_classify:
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=CLASSIFY_INPUT,
    output:
        f"{RUN_DIR}/eval/classify/{CLASSIFY_ID}/{{mode}}.json",
    wildcard_constraints:
        mode="|".join(["linear", *map(re.escape, SEMI_MODES)]),
    log:
        f"logs/{{experiment}}/{{run_id}}/classify-{CLASSIFY_ID}-{{mode}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/classify-{CLASSIFY_ID}-{{mode}}.tsv"
    threads: EVAL["threads"]
    resources:
        gpu=0,  # GPUs of the job (0: one CPU process); the SLURM profile sets 8: torchrun, one process each
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
        options=lambda wc: classify_options(wc.mode),
    shell:
        "cribo eval classify --checkpoint {params.ckpt} --data-root {CLASSIFY_ROOT} --dataset {CLASSIFY[dataset]} "
        "{params.options} --image-size {CLASSIFY[image_size]} --batch-size {CLASSIFY[batch_size]} "
        "--nproc-per-node {resources.gpu} --experiment {wildcards.experiment} --run-name {params.name} --out {output} "
        "--no-progress > {log} 2>&1"
