# VOC07 SVM classification and its low-shot variant: image-level descriptors of the SVM dataset's
# two splits (extract_global), then one SVM row and one row per (k, cost selection) (eval_svm*).
# On by evaluate.svm.enabled; on the toy scenes the image labels are the classes in each mask.
from cribo.data.registry import get_spec

SVM_SPEC = get_spec(SVM_DATASET)


rule extract_global:
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=SVM_INPUT,
    output:
        directory(f"{RUN_DIR}/features-global/{SVM_FEATURES_ID}/{{split}}"),
    log:
        f"logs/{{experiment}}/{{run_id}}/extract-global-{SVM_FEATURES_ID}-{{split}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/extract-global-{SVM_FEATURES_ID}-{{split}}.tsv"
    threads: workflow.cores
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
    shell:
        "cribo extract-global --checkpoint {params.ckpt} --dataset {SVM_DATASET} --data-root {SVM_ROOT} "
        "--split {wildcards.split} --image-size {SVM_SIZE} --batch-size {EVAL[batch_size]} "
        "--out {output} --no-progress > {log} 2>&1"


def _svm_inputs(wildcards):
    base = f"results/{wildcards.experiment}/{wildcards.run_id}"
    return {"summary": f"{base}/pretrain/summary.json",
            "train": f"{base}/features-global/{SVM_FEATURES_ID}/{SVM_SPEC.train_split}",
            "test": f"{base}/features-global/{SVM_FEATURES_ID}/{SVM_SPEC.val_split}"}


rule eval_svm:
    input:
        unpack(_svm_inputs),
    output:
        f"{RUN_DIR}/eval/svm/{SVM_ID}/full.json",
    log:
        f"logs/{{experiment}}/{{run_id}}/svm-{SVM_ID}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/svm-{SVM_ID}.tsv"
    threads: SVM["workers"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
    shell:
        "cribo eval svm --checkpoint {params.ckpt} --train-features {input.train} --test-features {input.test} "
        "--folds {SVM[folds]} --workers {threads} --experiment {wildcards.experiment} --run-name {params.name} "
        "--out {output} > {log} 2>&1"


rule eval_svm_lowshot:
    input:
        unpack(_svm_inputs),
    output:
        f"{RUN_DIR}/eval/svm/{SVM_ID}/lowshot-k{{k}}-{{selection}}.json",
    log:
        f"logs/{{experiment}}/{{run_id}}/svm-lowshot-{SVM_ID}-k{{k}}-{{selection}}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/svm-lowshot-{SVM_ID}-k{{k}}-{{selection}}.tsv"
    threads: SVM["workers"]
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
    shell:
        "cribo eval svm-lowshot --checkpoint {params.ckpt} --train-features {input.train} "
        "--test-features {input.test} --k {wildcards.k} --selection {wildcards.selection} "
        "--samples {SVM[lowshot_samples]} --folds {SVM[folds]} --workers {threads} "
        "--experiment {wildcards.experiment} --run-name {params.name} --out {output} > {log} 2>&1"
