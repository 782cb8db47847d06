# extract: the frozen teacher backbone's last-layer patch tokens of one split, on disk.
# The folder name carries the passes: "<split>-x1" (one plain pass, the queries) or "<split>-x2a"
# (two augmented passes, the in-context memory); a trailing "h" ("<split>-x2ah") extracts with
# open-hummingbird-eval's preprocessing (evaluate.incontext.protocol: open-hbird).


rule extract:
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=DATA_INPUT,
    output:
        directory(f"{RUN_DIR}/features/{FEATURES_ID}/{{split}}-{{passes}}"),
    log:
        f"logs/{{experiment}}/{{run_id}}/extract-{FEATURES_ID}-{{split}}-{{passes}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/extract-{FEATURES_ID}-{{split}}-{{passes}}.tsv"
    threads: EVAL["threads"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        size=EVAL["image_size"],
        batch=EVAL["batch_size"],
        passes=lambda wc: wc.passes[1:].rstrip("ah"),
        augment=lambda wc: "--augment" if wc.passes.rstrip("h").endswith("a") else "",
        preprocessing=lambda wc: "open-hbird" if wc.passes.endswith("h") else "clean",
    shell:
        "cribo extract --checkpoint {params.ckpt} --dataset {DATASET} --data-root {DATA_ROOT} "
        "--split {wildcards.split} --image-size {params.size} --batch-size {params.batch} "
        "--passes {params.passes} {params.augment} --protocol {params.preprocessing} --out {output} --no-progress > {log} 2>&1"
