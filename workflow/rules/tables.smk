# table: results tables from the JSON rows of this config's evaluations (and only those).


rule table:
    input:
        rows=incontext_rows() + overcluster_rows() + linear_rows() + finetune_rows() + svm_rows() + detect_rows()
        + classify_rows(),
        paper="config/paper_results.yaml",
    output:
        csv=report("results/tables/incontext.csv", caption="../report/incontext.rst", category="1. Tables", subcategory="in-context retrieval"),
        md="results/tables/incontext.md",
        oc_csv=report("results/tables/overcluster.csv", caption="../report/overcluster.rst", category="1. Tables", subcategory="overclustering"),
        oc_md="results/tables/overcluster.md",
        lin_csv=report("results/tables/linear.csv", caption="../report/linear.rst", category="1. Tables", subcategory="linear segmentation"),
        lin_md="results/tables/linear.md",
        ft_csv=report("results/tables/finetune.csv", caption="../report/finetune.rst", category="1. Tables", subcategory="fine-tuning"),
        ft_md="results/tables/finetune.md",
        svm_csv=report("results/tables/svm.csv", caption="../report/svm.rst", category="1. Tables", subcategory="VOC07 SVM"),
        svm_md="results/tables/svm.md",
        det_csv=report("results/tables/detect.csv", caption="../report/detect.rst", category="1. Tables", subcategory="detection"),
        det_md="results/tables/detect.md",
        cls_csv=report("results/tables/classify.csv", caption="../report/classify.rst", category="1. Tables", subcategory="classification"),
        cls_md="results/tables/classify.md",
        ab_csv=report("results/tables/ablations.csv", caption="../report/ablations.rst", category="1. Tables", subcategory="ablations"),
        ab_md="results/tables/ablations.md",
        paper_md=expand("results/tables/paper_{protocol}.md", protocol=PAPER_PROTOCOLS),
        paper_csv=[report(f"results/tables/paper_{p}.csv", caption="../report/paper.rst", category="1. Tables",
                          subcategory="paper comparison") for p in PAPER_PROTOCOLS],
        cribo_md=expand("results/tables/cribo_table{n}.md", n=(1, 2, 3)),
        cribo_csv=[report(f"results/tables/cribo_table{n}.csv", caption="../report/cribo_tables.rst",
                          category="1. Tables", subcategory="CrIBo Tables 1-3") for n in (1, 2, 3)],
        cribo_png=report("results/tables/cribo_tables.png", caption="../report/cribo_tables.rst",
                         category="1. Tables", subcategory="CrIBo Tables 1-3"),
        metrics="results/tables/metrics.json",
    log:
        "logs/tables/table.log",
    benchmark:
        "logs/benchmarks/tables/table.tsv"
    params:
        outdir=lambda wc, output: os.path.dirname(output.csv),
        ablation=f"--ablation-base {ABLATION_BASE}" if ABLATION_BASE else "",
    shell:
        "cribo table --rows {input.rows} --out {params.outdir} --paper {input.paper} {params.ablation} > {log} 2>&1"
