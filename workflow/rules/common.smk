# Names and paths shared by the rules. Run settings are resolved by the cribo library, which also
# computes the run ids that every artefact path carries.
import re
from pathlib import Path

from cribo.config import ConfigError, dataset_root, resolve_runs, run_id, short_hash
from cribo.eval.subsets import incontext_settings

EXPERIMENT = config["experiment"]
CONFIG_SOURCE = " + ".join(["config/config.yaml", *map(str, workflow.overwrite_configfiles)])
RUNS = resolve_runs(config, CONFIG_SOURCE)
RUN_IDS = {name: run_id(cfg) for name, cfg in RUNS.items()}
_twins = [n for n in RUNS if list(RUN_IDS.values()).count(RUN_IDS[n]) > 1]
if _twins:
    raise ConfigError(f"runs {', '.join(_twins)} have identical settings (same run id); make them differ or drop one")
TRAINED_IDS = list(RUN_IDS.values())
# baselines: pretrained weights imported as runs (no training); their id hashes what they are
# (a list names released checkpoints of config/checkpoints.yaml: import_baseline downloads them)
CHECKPOINT_CATALOGUE = "config/checkpoints.yaml"
CHECKPOINT_DOWNLOADS = "resources/checkpoints"
BASELINES = config.get("baselines") or {}
if isinstance(BASELINES, list):
    from cribo.models.catalogue import baseline_spec, load_catalogue

    _catalogue = load_catalogue(CHECKPOINT_CATALOGUE)
    BASELINES = {name: baseline_spec(_catalogue, name, CHECKPOINT_DOWNLOADS) for name in BASELINES}
for _name, _spec in BASELINES.items():
    if _name in RUN_IDS:
        raise ConfigError(f"baselines.{_name}: a run has the same name; rename one of them")
    # a catalogue checkpoint is what its name says; a local file is its path and how it is read
    _identity = ("catalogue", "timm_model", "method", "pretrain") if _spec.get("catalogue") else (
        "weights", "timm_model", "method", "pretrain")
    RUN_IDS[_name] = short_hash({k: _spec.get(k) for k in _identity})
BASELINE_IDS = [RUN_IDS[n] for n in BASELINES]
RUN_NAME = {rid: name for name, rid in RUN_IDS.items()}
# the process layout of each trained run (cribo.train.launch_layout): torchrun on one node, or srun tasks
from cribo.train.launch_layout import launch_layout

LAYOUTS = {RUN_IDS[n]: launch_layout(cfg["train"], f"{CONFIG_SOURCE} (runs.{n})") for n, cfg in RUNS.items()}
SRUN_IDS = [rid for rid, layout in LAYOUTS.items() if layout["launcher"] == "srun"]
TORCHRUN_IDS = [rid for rid in TRAINED_IDS if rid not in SRUN_IDS] or ["-"]

DATASET = config["dataset"]["name"]
DATA_ROOT = dataset_root(config)
# what a rule waits for: the generated toy folder, or a prepared dataset's completion marker
# (written last by `cribo data prepare`; rules datasets.smk build it from the downloads)
DATA_INPUT = DATA_ROOT if DATASET == "toyscenes" else f"{DATA_ROOT}/.prepared.json"
EVAL = config["evaluate"]
INCONTEXT = EVAL["incontext"]
# floats, as the CLI parses them: a fraction written 1 in the config is the row f1.0
INCONTEXT_FRACTIONS = [float(f) for f in INCONTEXT["fractions"]]
INCONTEXT_SETTINGS = incontext_settings(INCONTEXT_FRACTIONS, INCONTEXT["seeds"], INCONTEXT["memory_size"])
# threads of one evaluation job and of one pretraining (Snakemake runs jobs side by side up to --cores)
PRETRAIN_THREADS = config["pretrain_threads"]
# Folder names that carry the settings of the artefacts inside them.
# The dataset folder is hashed in too: a regenerated or moved dataset must not reuse old features
# (a DVC experiment's temporary copy has no Snakemake metadata to notice the change otherwise).
FEATURES_ID = f"{DATASET}-{short_hash(DATA_ROOT, 6)}-{EVAL['image_size']}px"
_INCONTEXT_SETTINGS = {k: INCONTEXT[k] for k in ('k', 'temperature', 'memory_size', 'memory_passes', 'memory_augment')}
if INCONTEXT["protocol"] != "clean":  # the clean protocol keeps the ids it had before the choice existed
    _INCONTEXT_SETTINGS["protocol"] = INCONTEXT["protocol"]
INCONTEXT_ID = f"{FEATURES_ID}-{short_hash(_INCONTEXT_SETTINGS, 6)}"
OVERCLUSTER = EVAL["overcluster"]
OVERCLUSTER_ID = f"{FEATURES_ID}-{short_hash({k: OVERCLUSTER[k] for k in ('seeds', 'pca_dim', 'iterations', 'restarts')}, 6)}"
LINEAR = EVAL["linear"]
LINEAR_SIZE = LINEAR["image_size"] or EVAL["image_size"]
DENSE = EVAL["dense"]
ABLATION_BASE = (config.get("ablations") or {}).get("base") if (config.get("ablations") or {}).get("grid") else None
PAPER_PROTOCOLS = ["incontext", "linear", "finetune", "overcluster", "svm", "svm_lowshot", "detect_box", "detect_mask",
                   "classify_linear", "classify_semi"]
FINETUNE = EVAL["finetune"]
DATA_ID = f"{DATASET}-{short_hash(DATA_ROOT, 6)}"
# one settings id per protocol: changing one protocol's settings leaves the others' rows valid
_LEOPART = {k: LINEAR[k] for k in ("image_size", "mask_size", "epochs", "drop_at", "lr", "batch_size", "seed")}
LINEAR_IDS = {
    "leopart": f"{DATA_ID}-{LINEAR_SIZE}px-{short_hash(_LEOPART, 6)}",
    "mmseg": f"{DATA_ID}-{DENSE['crop']}px-{short_hash({**LINEAR['mmseg'], **DENSE}, 6)}",
}
FINETUNE_ID = f"{DATA_ID}-{DENSE['crop']}px-{short_hash({**{k: v for k, v in FINETUNE.items() if k != 'decoders'}, **DENSE}, 6)}"
RUN_DIR = "results/{experiment}/{run_id}"
# VOC07 SVM: its own dataset (voc2007) or the evaluation dataset with labels from the masks
SVM = EVAL["svm"]
SVM_DATASET = SVM["dataset"] or DATASET
if SVM["dataset"] is None:
    SVM_ROOT = SVM["root"] or DATA_ROOT
else:  # a prepared dataset (`cribo data prepare voc2007`), resources/<name> unless svm.root says otherwise
    SVM_ROOT = SVM["root"] or f"resources/{SVM['dataset']}"
SVM_INPUT = SVM_ROOT if SVM_DATASET == "toyscenes" else f"{SVM_ROOT}/.prepared.json"
SVM_SIZE = SVM["image_size"] or EVAL["image_size"]
SVM_FEATURES_ID = f"{SVM_DATASET}-{short_hash(SVM_ROOT, 6)}-{SVM_SIZE}px"
SVM_ID = f"{SVM_FEATURES_ID}-{short_hash({k: SVM[k] for k in ('folds', 'lowshot_samples')}, 6)}"
# feature folders: the queries in one plain pass, the memory as the protocol asks
# ("h": extracted with open-hummingbird-eval's preprocessing, for evaluate.incontext.protocol open-hbird)
QUERY_PASSES = "x1"
MEMORY_PASSES = f"x{INCONTEXT['memory_passes']}{'a' if INCONTEXT['memory_augment'] else ''}"
_HBIRD = "h" if INCONTEXT["protocol"] == "open-hbird" else ""
INCONTEXT_QUERY_PASSES, INCONTEXT_MEMORY_PASSES = QUERY_PASSES + _HBIRD, MEMORY_PASSES + _HBIRD


wildcard_constraints:
    experiment="[A-Za-z0-9_-]+",
    run_id="[0-9a-f]{8}",
    split="[A-Za-z0-9_]+",
    fraction="[0-9.]+",
    seed="[0-9]+",
    passes="x[0-9]+a?h?",
    clusters="classes|[0-9]+",
    protocol="leopart|mmseg",
    decoder="mask|linear",
    setting="[A-Za-z0-9_.-]+",
    selection="test|cv",
    k="[0-9]+",


def incontext_rows():
    """Every (run, fraction, seed) row of the in-context table; a full memory needs one seed."""
    return [f"results/{EXPERIMENT}/{rid}/eval/incontext/{INCONTEXT_ID}/f{fraction}-s{seed}.json"
            for rid in RUN_IDS.values() for fraction, seed in INCONTEXT_SETTINGS]


def overcluster_rows():
    """Every (run, K) row of the overclustering table."""
    return [f"results/{EXPERIMENT}/{rid}/eval/overcluster/{OVERCLUSTER_ID}/k{k}.json"
            for rid in RUN_IDS.values() for k in OVERCLUSTER["clusters"]]


def check_named_runs(key: str, names) -> None:
    """A config list of run names (``evaluate.<key>.runs``) may only name runs and baselines."""
    unknown = [n for n in (names or []) if n not in RUN_IDS]
    if unknown:
        raise ConfigError(f"evaluate.{key}.runs names {', '.join(unknown)}, which are neither runs nor "
                          f"baselines ({', '.join(RUN_IDS)})")


DETECT = EVAL["detect"]
check_named_runs("detect", DETECT["runs"])
DETECT_FILES = {
    "train_ann": DETECT["train_ann"] or f"{DATA_ROOT}/annotations/instances_train.json",
    "val_ann": DETECT["val_ann"] or f"{DATA_ROOT}/annotations/instances_val.json",
    "train_images": DETECT["train_images"] or DATA_ROOT,
    "val_images": DETECT["val_images"] or DATA_ROOT,
}
DETECT_ID = short_hash({**{k: v for k, v in DETECT.items() if k != "runs"}, **DETECT_FILES}, 8)


def detect_data_input():
    """What detection waits for: the evaluation dataset (its own instances), or the prepared dataset
    its annotation file lies in (resources/coco-instances/annotations/... -> that folder's marker)."""
    from cribo.data.registry import PREPARED

    if not DETECT["train_ann"]:
        return [DATA_INPUT]
    parts = DETECT["train_ann"].split("/")
    if len(parts) >= 3 and parts[0] == "resources" and parts[1] in PREPARED:
        return [f"resources/{parts[1]}/.prepared.json"]
    return []  # files of the user's own: they must exist


def detect_rows():
    return [f"results/{EXPERIMENT}/{RUN_IDS[name]}/eval/detect/{DETECT_ID}.json" for name in DETECT["runs"]]


check_named_runs("svm", SVM["runs"])
# ImageNet-style classification: a user-provided ImageFolder, or the toy's classification view
CLASSIFY = EVAL["classify"]
check_named_runs("classify", CLASSIFY["runs"])
if CLASSIFY["dataset"] == "toyscenes":
    CLASSIFY_ROOT = CLASSIFY["root"] or f"resources/toyfolder-{short_hash(DATA_ROOT, 6)}"
    CLASSIFY_INPUT = f"{CLASSIFY_ROOT}/.prepared.json"
else:
    _user_roots = config.get("datasets", {}).get("roots", {})
    CLASSIFY_ROOT = CLASSIFY["root"] or _user_roots.get(CLASSIFY["dataset"], f"resources/{CLASSIFY['dataset']}")
    # ImageNet named in datasets.roots is checked once (rule check_user_dataset); other folders must exist
    CLASSIFY_INPUT = (f"resources/checked/{CLASSIFY['dataset']}.json"
                      if CLASSIFY["dataset"] == "imagenet" and "imagenet" in _user_roots else [])


def is_percent_list(subset) -> bool:
    """``<n>percent``: an official ImageNet list, or on the toy the toy's own class-balanced list."""
    return re.fullmatch(r"[0-9.]+percent", subset) is not None


def _subset_label(subset):
    """A subset's name in file names: the official / toy name as is, a file by its stem."""
    return subset if is_percent_list(subset) else re.sub(r"[^A-Za-z0-9_-]", "_", Path(subset).stem)


CLASSIFY_SUBSETS = {_subset_label(s): s for s in CLASSIFY["subsets"]}
if len(CLASSIFY_SUBSETS) != len(CLASSIFY["subsets"]):
    raise ConfigError(f"evaluate.classify.subsets in {CONFIG_SOURCE}: two lists share a name "
                      f"({CLASSIFY['subsets']}); rename one file")
CLASSIFY_ID = (f"{CLASSIFY['dataset']}-{short_hash(CLASSIFY_ROOT, 6)}-{CLASSIFY['image_size']}px-"
               f"{short_hash({k: CLASSIFY[k] for k in ('batch_size', 'linear', 'semi')}, 6)}")


def _grid_axis(value):
    return [value] if isinstance(value, (int, float)) else list(value)


# semi-supervised fine-tuning: one row per subset list and grid point (lr, head_lr_mult), as ORL's
# official grid; a single point keeps the short name semi-<subset>
_SEMI_GRID = [(lr, mult) for lr in _grid_axis(CLASSIFY["semi"]["lr"])
              for mult in _grid_axis(CLASSIFY["semi"]["head_lr_mult"])]
SEMI_MODES = {
    (f"semi-{label}" if len(_SEMI_GRID) == 1 else f"semi-{label}-lr{lr:g}-x{mult:g}"): (label, lr, mult)
    for label in CLASSIFY_SUBSETS for lr, mult in _SEMI_GRID}


def classify_subset_arg(label):
    """What `cribo eval classify --subset-list` gets: the toy's own list, an official name or a file."""
    subset = CLASSIFY_SUBSETS[label]
    if CLASSIFY["dataset"] == "toyscenes" and is_percent_list(subset):
        return f"{CLASSIFY_ROOT}/subsets/{subset}.txt"
    return subset


def classify_rows():
    """One linear row and one row per subset list of every run (or of classify.runs), when enabled."""
    if not CLASSIFY["enabled"]:
        return []
    rows = []
    for name, rid in RUN_IDS.items():
        if CLASSIFY["runs"] is not None and name not in CLASSIFY["runs"]:
            continue
        base = f"results/{EXPERIMENT}/{rid}/eval/classify/{CLASSIFY_ID}"
        if "linear" in CLASSIFY["modes"]:
            rows.append(f"{base}/linear.json")
        if "semi" in CLASSIFY["modes"]:
            rows += [f"{base}/{mode}.json" for mode in SEMI_MODES]
    return rows


def svm_rows():
    """The full SVM row and every (k, cost selection) low-shot row of every run (or of svm.runs), when enabled."""
    if not SVM["enabled"]:
        return []
    rows = []
    for name, rid in RUN_IDS.items():
        if SVM["runs"] is not None and name not in SVM["runs"]:
            continue
        rows.append(f"results/{EXPERIMENT}/{rid}/eval/svm/{SVM_ID}/full.json")
        rows += [f"results/{EXPERIMENT}/{rid}/eval/svm/{SVM_ID}/lowshot-k{k}-{sel}.json"
                 for k in SVM["lowshot_k"] for sel in SVM["lowshot_selection"]]
    return rows


def pretrain_data_input(wildcards):
    """What a run's pretraining waits for: the evaluation dataset, or the prepared (or checked)
    dataset its own ``data.root`` names (e.g. resources/coco/train2017 -> resources/coco/.prepared.json)."""
    from cribo.data.registry import PREPARED

    data = RUNS[RUN_NAME[wildcards.run_id]].get("data") or {}
    root = str(data.get("root") or DATA_ROOT)
    if root == DATA_ROOT:
        return [DATA_INPUT]
    parts = root.split("/")
    if len(parts) >= 2 and parts[0] == "resources" and parts[1] in PREPARED:
        return [f"resources/{parts[1]}/.prepared.json"]
    if data.get("dataset") in ("imagenet", "cityscapes") and data["dataset"] in config.get("datasets", {}).get("roots", {}):
        return [f"resources/checked/{data['dataset']}.json"]
    return []  # a folder of the user's own: it must exist


def linear_rows():
    return [f"results/{EXPERIMENT}/{rid}/eval/linear/{p}/{LINEAR_IDS[p]}.json"
            for rid in RUN_IDS.values() for p in LINEAR["protocols"]]


def finetune_rows():
    return [f"results/{EXPERIMENT}/{rid}/eval/finetune/{d}/{FINETUNE_ID}.json"
            for rid in RUN_IDS.values() for d in FINETUNE["decoders"]]


def dense_options():
    """CLI options of the mmseg-style geometry, shared by the mmseg linear probe and fine-tuning."""
    return (f"--crop {DENSE['crop']} --stride {DENSE['stride']} --scale {DENSE['scale'][0]} {DENSE['scale'][1]} "
            f"--normalisation {DENSE['normalisation']} --precision {DENSE['precision']}")


def linear_options(wildcards):
    """The protocol's own CLI options of `cribo eval linear`."""
    if wildcards.protocol == "leopart":
        return (f"--image-size {LINEAR_SIZE} --mask-size {LINEAR['mask_size']} --epochs {LINEAR['epochs']} "
                f"--drop-at {LINEAR['drop_at']} --lr {LINEAR['lr']} --batch-size {LINEAR['batch_size']} "
                f"--seed {LINEAR['seed']}")
    m = LINEAR["mmseg"]
    return (f"--iterations {m['iterations']} --optimizer {m['optimizer']} --lr {m['lr']} "
            f"--weight-decay {m['weight_decay']} --batch-size {m['batch_size']} --seed {m['seed']} {dense_options()}")


def finetune_options(wildcards):
    f = FINETUNE
    return (f"--decoder {wildcards.decoder} --iterations {f['iterations']} --optimizer {f['optimizer']} "
            f"--lr {f['lr']} --weight-decay {f['weight_decay']} --layer-decay {f['layer_decay']} "
            f"--drop-path {f['drop_path']} --decoder-layers {f['decoder_layers']} --batch-size {f['batch_size']} "
            f"--seed {f['seed']} {dense_options()}")



def run_layout(wildcards):
    return LAYOUTS[wildcards.run_id]


def classify_options(mode):
    """`cribo eval classify` options of one row: ``linear``, or one of ``SEMI_MODES`` (subset list and grid point)."""
    if mode == "linear":
        c = CLASSIFY["linear"]
        return f"--mode linear --epochs {c['epochs']} --steps {' '.join(map(str, c['steps']))} --lr {c['lr']}"
    c = CLASSIFY["semi"]
    label, lr, mult = SEMI_MODES[mode]
    return (f"--mode semi --subset-list {classify_subset_arg(label)} --epochs {c['epochs']} "
            f"--steps {' '.join(map(str, c['steps']))} --lr {lr} --head-lr-mult {mult}")
