# table: results tables from the JSON rows of this config's evaluations (and only those).


rule table:
    input:
        incontext_rows(),
        overcluster_rows(),
        linear_rows(),
        finetune_rows(),
    output:
        csv="results/tables/incontext.csv",
        md="results/tables/incontext.md",
        oc_csv="results/tables/overcluster.csv",
        oc_md="results/tables/overcluster.md",
        lin_csv="results/tables/linear.csv",
        lin_md="results/tables/linear.md",
        ft_csv="results/tables/finetune.csv",
        ft_md="results/tables/finetune.md",
        metrics="results/tables/metrics.json",
    log:
        "logs/tables/table.log",
    benchmark:
        "logs/benchmarks/tables/table.tsv"
    params:
        outdir=lambda wc, output: os.path.dirname(output.csv),
    shell:
        "cribo table --rows {input} --out {params.outdir} > {log} 2>&1"
