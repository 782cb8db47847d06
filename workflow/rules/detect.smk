# Detection and instance segmentation (Mask R-CNN R50-FPN v2, 1x) of the ResNet-50 runs named in
# evaluate.detect.runs, on COCO-format instances (the toy scenes' own by default), and the random
# weights that the "Random" baselines import.


rule init_weights:
    # a randomly initialised torchvision-layout ResNet (ORL's "Random" rows), for `baselines:`
    output:
        "resources/weights/random_{arch}-s{seed}.pth",
    wildcard_constraints:
        arch="resnet[a-z0-9_]+",
    log:
        "logs/weights/random_{arch}-s{seed}.log",
    shell:
        "cribo init-weights --arch {wildcards.arch} --seed {wildcards.seed} --out {output} > {log} 2>&1"


rule eval_detect:
    input:
        summary=f"{RUN_DIR}/pretrain/summary.json",
        data=detect_data_input(),
    output:
        f"{RUN_DIR}/eval/detect/{DETECT_ID}.json",
    log:
        f"logs/{{experiment}}/{{run_id}}/detect-{DETECT_ID}.log",
    benchmark:
        f"logs/benchmarks/{{experiment}}/{{run_id}}/detect-{DETECT_ID}.tsv"
    threads: workflow.cores
    resources:
        # GPUs of the job (0: one CPU process); the SLURM profile sets 8, and `cribo eval detect` then
        # relaunches itself under torchrun, one process per GPU with SyncBN (batch_size stays global)
        gpu=0,
    params:
        ckpt=lambda wc, input: os.path.join(os.path.dirname(input.summary), "checkpoint.pth"),
        name=lambda wc: RUN_NAME[wc.run_id],
        steps=" ".join(map(str, DETECT["steps"])),
        sizes=" ".join(map(str, DETECT["min_size"])),
    shell:
        "cribo eval detect --checkpoint {params.ckpt} --train-ann {DETECT_FILES[train_ann]} "
        "--val-ann {DETECT_FILES[val_ann]} --train-images {DETECT_FILES[train_images]} "
        "--val-images {DETECT_FILES[val_images]} --iterations {DETECT[iterations]} "
        "--batch-size {DETECT[batch_size]} --lr {DETECT[lr]} --steps {params.steps} --warmup {DETECT[warmup]} "
        "--min-size {params.sizes} --test-size {DETECT[test_size]} --max-size {DETECT[max_size]} "
        "--rpn-batch-per-image {DETECT[rpn_batch_per_image]} --roi-batch-per-image {DETECT[roi_batch_per_image]} "
        "--proposals-train {DETECT[proposals_train]} --proposals-test {DETECT[proposals_test]} "
        "--nproc-per-node {resources.gpu} --experiment {wildcards.experiment} --run-name {params.name} "
        "--out {output} --no-progress > {log} 2>&1"
