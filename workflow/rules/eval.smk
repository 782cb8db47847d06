# eval_incontext: dense nearest-neighbour retrieval of the val split against a training fraction.
from cribo.data.registry import get_spec

SPEC = get_spec(DATASET)


rule eval_incontext:
    # every (fraction, seed) row of one run in one job: the stores are loaded once
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        train=f"{RUN_DIR}/features/{FEATURES_ID}/{SPEC.train_split}-{INCONTEXT_MEMORY_PASSES}",
        val=f"{RUN_DIR}/features/{FEATURES_ID}/{SPEC.val_split}-{INCONTEXT_QUERY_PASSES}",
    output:
        [f"{RUN_DIR}/eval/incontext/{INCONTEXT_ID}/f{fraction}-s{seed}.json" for fraction, seed in INCONTEXT_SETTINGS],
    log:
        f"logs/{{experiment}}/{{run_id}}/incontext-{INCONTEXT_ID}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/incontext-{INCONTEXT_ID}.tsv"
    threads: EVAL["threads"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
        memory=f"--memory-size {INCONTEXT['memory_size']}" if INCONTEXT["memory_size"] else "",
        fractions=" ".join(str(f) for f in INCONTEXT_FRACTIONS),
        seeds=" ".join(str(s) for s in INCONTEXT["seeds"]),
        out=lambda wc: f"results/{wc.experiment}/{wc.run_id}/eval/incontext/{INCONTEXT_ID}/f{{fraction}}-s{{seed}}.json",
    shell:
        "cribo eval incontext --checkpoint {params.ckpt} --dataset {DATASET} --data-root {DATA_ROOT} "
        "--train-features {input.train} --val-features {input.val} "
        "--k {INCONTEXT[k]} --temperature {INCONTEXT[temperature]} {params.memory} --protocol {INCONTEXT[protocol]} "
        "--fraction {params.fractions} --seed {params.seeds} "
        "--experiment {wildcards.experiment} --run-name {params.name} "
        "--out {params.out:q} --no-progress > {log} 2>&1"


rule figures:
    # in-context predictions beside the ground truth, and cross-image object matches (PNGs)
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        train=f"{RUN_DIR}/features/{FEATURES_ID}/{SPEC.train_split}-{INCONTEXT_MEMORY_PASSES}",
        val=f"{RUN_DIR}/features/{FEATURES_ID}/{SPEC.val_split}-{INCONTEXT_QUERY_PASSES}",
    output:
        report(directory(f"{RUN_DIR}/figures/{INCONTEXT_ID}"), patterns=["{name}.png"],
               caption="../report/figures.rst", category="3. Figures", subcategory="run {run_id}",
               labels={"run id": "{run_id}", "figure": "{name}"}),
    log:
        f"logs/{{experiment}}/{{run_id}}/figures-{INCONTEXT_ID}.log",
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
    shell:
        "cribo figures --checkpoint {params.ckpt} --dataset {DATASET} --data-root {DATA_ROOT} "
        "--train-features {input.train} --val-features {input.val} --k {INCONTEXT[k]} "
        "--temperature {INCONTEXT[temperature]} --out-dir {output} > {log} 2>&1"


rule eval_overcluster:
    # k-means of the standardised, PCA-reduced validation features; clusters matched to classes
    # (every K of one run in one job)
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        val=f"{RUN_DIR}/features/{FEATURES_ID}/{SPEC.val_split}-{QUERY_PASSES}",
    output:
        [f"{RUN_DIR}/eval/overcluster/{OVERCLUSTER_ID}/k{k}.json" for k in OVERCLUSTER["clusters"]],
    log:
        f"logs/{{experiment}}/{{run_id}}/overcluster-{OVERCLUSTER_ID}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/overcluster-{OVERCLUSTER_ID}.tsv"
    threads: EVAL["threads"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
        clusters=" ".join(str(k) for k in OVERCLUSTER["clusters"]),
        out=lambda wc: f"results/{wc.experiment}/{wc.run_id}/eval/overcluster/{OVERCLUSTER_ID}/k{{clusters}}.json",
    shell:
        "cribo eval overcluster --checkpoint {params.ckpt} --val-features {input.val} "
        "--clusters {params.clusters} --seeds {OVERCLUSTER[seeds]} --pca-dim {OVERCLUSTER[pca_dim]} "
        "--iterations {OVERCLUSTER[iterations]} --restarts {OVERCLUSTER[restarts]} "
        "--experiment {wildcards.experiment} --run-name {params.name} --out {params.out:q} > {log} 2>&1"


rule eval_linear:
    # a 1x1 convolution trained on the frozen backbone's tokens (augmented crops: not from stores)
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=DATA_INPUT,
    output:
        f"{RUN_DIR}/eval/linear/{{protocol}}/{{setting}}.json",
    log:
        f"logs/{{experiment}}/{{run_id}}/linear-{{protocol}}-{{setting}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/linear-{{protocol}}-{{setting}}.tsv"
    threads: EVAL["threads"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
        options=linear_options,
    shell:
        "cribo eval linear --checkpoint {params.ckpt} --dataset {DATASET} --data-root {DATA_ROOT} "
        "--protocol {wildcards.protocol} {params.options} --experiment {wildcards.experiment} "
        "--run-name {params.name} --out {output} --no-progress > {log} 2>&1"


rule eval_finetune:
    # backbone unfrozen + decoder, mmseg-style crops and sliding-window scoring; resumable state next to the row
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=DATA_INPUT,
    output:
        f"{RUN_DIR}/eval/finetune/{{decoder}}/{{setting}}.json",
    log:
        f"logs/{{experiment}}/{{run_id}}/finetune-{{decoder}}-{{setting}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/finetune-{{decoder}}-{{setting}}.tsv"
    threads: EVAL["threads"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
        options=finetune_options,
    shell:
        "cribo eval finetune --checkpoint {params.ckpt} --dataset {DATASET} --data-root {DATA_ROOT} "
        "{params.options} --experiment {wildcards.experiment} --run-name {params.name} "
        "--out {output} --no-progress > {log} 2>&1"
