# extract: the frozen teacher backbone's last-layer patch tokens of one split, on disk.


rule extract:
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=DATA_ROOT,
    output:
        directory(f"{RUN_DIR}/features/{FEATURES_ID}/{{split}}"),
    log:
        f"logs/{{experiment}}/{{run_id}}/extract-{FEATURES_ID}-{{split}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/extract-{FEATURES_ID}-{{split}}.tsv"
    threads: workflow.cores
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        size=EVAL["image_size"],
        batch=EVAL["batch_size"],
    shell:
        "cribo extract --checkpoint {params.ckpt} --dataset {DATASET} --data-root {input.data} "
        "--split {wildcards.split} --image-size {params.size} --batch-size {params.batch} "
        "--out {output} --no-progress > {log} 2>&1"
