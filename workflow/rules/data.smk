# download: the embedded toy scenes are generated here; real datasets get their download and
# prepare rules with the dataset stage (until then their prepared folder must exist).

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
