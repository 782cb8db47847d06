# download: the embedded toy scenes are generated here; real datasets are downloaded and prepared
# by datasets.smk (their completion marker is the DAG's DATA_INPUT).

if DATASET == "toyscenes":

    rule download_toyscenes:
        output:
            directory(DATA_ROOT),
        params:
            gen=config["dataset"].get("toyscenes", {}),
        log:
            "logs/data/download_toyscenes.log",
        benchmark:
            "logs/benchmarks/data/download_toyscenes.tsv"
        threads: 2
        shell:
            "cribo data toyscenes --out {output} --num-train {params.gen[num_train]} "
            "--num-val {params.gen[num_val]} --image-size {params.gen[image_size]} "
            "--seed {params.gen[seed]} --workers {threads} > {log} 2>&1"
