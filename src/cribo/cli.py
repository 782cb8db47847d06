"""The ``cribo`` command line: parses arguments and calls the library, nothing more.

Subcommands: ``data`` (generate or list datasets), ``config`` (resolve a run config), ``train``, ``export``,
``extract``, ``eval incontext`` and ``table``. Errors a user can fix (bad config key, unknown
dataset, corrupt file) are printed as one ``error:`` line naming the culprit, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

EXIT_USAGE = 2


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: a 0 would only fail later, as a ZeroDivisionError."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_common_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name, e.g. toyscenes or voc (`cribo data list`)")
    p.add_argument("--data-root", required=True, help="folder of the dataset in the Pascal VOC layout")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="evaluation resolution (square); default: the checkpoint's training crop size")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the backbone runs")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--timm-model", default=None,
                   help="timm architecture of a bare weights file given as --checkpoint (e.g. vit_small_patch16_224.dino); "
                        "not needed for our checkpoints, official CrIBo/DINO checkpoints or exports")


def _add_dense_args(p: argparse.ArgumentParser, *, optimizer: str, weight_decay: float, iterations: int) -> None:
    """Options of the iteration-based mmseg-style protocols (mmseg linear probe and fine-tuning)."""
    g = p.add_argument_group("mmseg-style training (linear --protocol mmseg, finetune)")
    g.add_argument("--iterations", type=positive_int, default=iterations,
                   help=f"training iterations (default {iterations}: VOC; 160000 for ADE20K and COCO-Stuff)")
    g.add_argument("--optimizer", default=optimizer, choices=["adam", "adamw", "sgd"], help=f"default {optimizer}")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help=f"default {weight_decay}")
    g.add_argument("--min-lr", type=float, default=None, help="floor of the poly schedule (default lr / 10)")
    g.add_argument("--crop", type=positive_int, default=512, help="training crop and sliding window side (default 512)")
    g.add_argument("--stride", type=positive_int, default=480, help="sliding-window stride (default 480)")
    g.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="resize bound (long, short) of the test images and, times 0.5-2, of the training images")
    g.add_argument("--normalisation", default="imagenet", choices=["imagenet", "half"],
                   help="input normalisation: ImageNet statistics (default) or mmseg's Segmenter 127.5/127.5")
    g.add_argument("--precision", default="auto", choices=["fp32", "fp16", "bf16", "auto"],
                   help="autocast of the forwards (training and inference): auto = bf16 or fp16 on a GPU, "
                        "fp32 on CPU (default auto)")
    g.add_argument("--checkpoint-every", type=int, default=1000,
                   help="iterations between resumable state saves next to --out (default 1000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cribo",
        description="CrIBo pipeline: pretrain self-supervised ViTs, extract dense features, "
                    "evaluate them and build result tables.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # ---- data ----
    data = sub.add_parser("data", help="datasets: generate the toy, download / prepare real ones, check user-provided ones")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    toy = data_sub.add_parser("toyscenes", help="generate the embedded toy scene dataset (VOC + COCO layouts)")
    toy.add_argument("--out", required=True, help="output folder (created atomically)")
    toy.add_argument("--num-train", type=positive_int, default=2000, help="training images (default 2000)")
    toy.add_argument("--num-val", type=positive_int, default=200, help="validation images (default 200)")
    toy.add_argument("--image-size", type=positive_int, default=112, help="image side in pixels (default 112)")
    toy.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    toy.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    data_sub.add_parser("list", help="list the known dataset names")
    dl = data_sub.add_parser("download", help="download, verify and extract the archives of a dataset")
    dl.add_argument("name", help="dataset (voc, ade20k, coco, coco-stuff15, coco-things12, coco-stuff171), archive name, "
                                 "or imagenet-subsets (the official 1 %% and 10 %% lists, verified, into --downloads)")
    dl.add_argument("--downloads", default="resources/downloads", help="folder for the archives (default resources/downloads)")
    dl.add_argument("--raw", default="resources/raw", help="archives are extracted into RAW/<archive>/ (default resources/raw)")
    dl.add_argument("--mirror", default=None, help="fetch <MIRROR>/<filename> instead of the registry URL")
    dl.add_argument("--remove-archives", action="store_true", help="delete each archive once extracted")
    dl.add_argument("--retries", type=int, default=4, help="retries of transient network errors (default 4)")
    dl.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pp = data_sub.add_parser("prepare", help="build a dataset's masks and split lists from its extracted archives")
    pp.add_argument("name", help="voc, ade20k, coco, coco-stuff15, coco-things12 or coco-stuff171")
    pp.add_argument("--raw", default="resources/raw", help="folder holding RAW/<archive>/ (default resources/raw)")
    pp.add_argument("--out", required=True, help="prepared dataset folder (completion marker .prepared.json)")
    pp.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    pp.add_argument("--force", action="store_true", help="redo even if the completion marker exists")
    pp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    tf = data_sub.add_parser("toy-folder", help="the toy scenes as an ImageFolder classification set (label: the "
                                                "largest object), with class-balanced 1 %% / 10 %% subset lists")
    tf.add_argument("--toy-root", required=True, help="a generated toyscenes folder")
    tf.add_argument("--out", required=True, help="output folder: train/<class>/, val/<class>/, subsets/<n>percent.txt")
    tf.add_argument("--percents", type=float, nargs="+", default=[1, 10], help="subset lists to write (default 1 10)")
    ck = data_sub.add_parser("check", help="check a user-provided dataset tree (imagenet, cityscapes)")
    ck.add_argument("name", choices=["imagenet", "cityscapes"])
    ck.add_argument("--root", required=True, help="folder the user provides")
    ck.add_argument("--no-count-check", action="store_true", help="accept image counts other than the official ones")
    ck.add_argument("--out", default=None, help="write the counts as JSON here when the tree is complete")

    # ---- config ----
    conf = sub.add_parser("config", help="resolve run configs from a workflow config")
    conf_sub = conf.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    res = conf_sub.add_parser("resolve", help="write the full, validated config of one run")
    res.add_argument("--config", required=True, help="workflow config (with 'pretrain' and 'runs')")
    res.add_argument("--run", required=True, help="run name under 'runs'")
    res.add_argument("--out", required=True, help="output YAML file")
    lst = conf_sub.add_parser("runs", help="print the runs of a workflow config with their run ids")
    lst.add_argument("--config", required=True, help="workflow config")

    # ---- train ----
    tr = sub.add_parser("train", help="pretrain (resumes from OUTPUT_DIR/checkpoint.pth when present)")
    tr.add_argument("--config", required=True,
                    help="run config YAML, or a workflow config together with --run")
    tr.add_argument("--run", default=None, help="run name, when --config is a workflow config with 'runs'")
    tr.add_argument("--output-dir", required=True, help="folder for checkpoint.pth, config.yaml, log.txt")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, dotted key, YAML value (e.g. optim.lr=0.001); repeatable")
    tr.add_argument("--summary", default=None,
                    help="also write a JSON summary here once training has finished (the DAG's completion marker)")
    tr.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                    help="processes (GPUs) on this node; N > 1 relaunches this command under torchrun --standalone "
                         "(0 or 1: one process). Under srun with one task per GPU, leave it at 1")

    # ---- ORL stage 2 ----
    orl = sub.add_parser("orl", help="ORL stage 2: correspondence discovery, as shardable steps (see README, ORL)")
    orl_sub = orl.add_subparsers(dest="orl_command", required=True, metavar="STEP")
    knn = orl_sub.add_parser("knn", help="image embeddings of the stage-1 run's images and their k nearest images")
    knn.add_argument("--checkpoint", required=True, help="stage-1 (method byol) checkpoint.pth")
    knn.add_argument("--k", type=int, default=10, help="neighbours per image (ORL: 10)")
    knn.add_argument("--device", default="cpu")
    knn.add_argument("--out", required=True, help="kNN file (.npz)")
    props = orl_sub.add_parser("proposals", help="selective search + box filter of one shard of images")
    props.add_argument("--knn", required=True, help="kNN file of `cribo orl knn` (holds the image list)")
    props.add_argument("--shard", type=int, required=True)
    props.add_argument("--num-shards", type=int, required=True)
    props.add_argument("--min-size", type=int, default=96, help="smallest RoI side in pixels (ORL: 96)")
    props.add_argument("--max-aspect-ratio", type=float, default=3.0)
    props.add_argument("--max-iou", type=float, default=0.5)
    props.add_argument("--top-n", type=int, default=100, help="RoIs kept per image (ORL: 100)")
    props.add_argument("--out", required=True, help="proposals shard (.npz)")
    roi = orl_sub.add_parser("roi-embed", help="one stage-1 backbone embedding per kept RoI of one shard")
    roi.add_argument("--checkpoint", required=True, help="stage-1 (method byol) checkpoint.pth")
    roi.add_argument("--knn", required=True)
    roi.add_argument("--proposals", required=True, help="the shard's proposals file")
    roi.add_argument("--device", default="cpu")
    roi.add_argument("--out", required=True, help="RoI embeddings of the shard (.npy, float16)")
    prs = orl_sub.add_parser("pairs", help="top RoI pairs of one shard of query images with their neighbours")
    prs.add_argument("--knn", required=True)
    prs.add_argument("--proposals", nargs="+", required=True, help="every proposals shard, in order")
    prs.add_argument("--rois", nargs="+", required=True, help="every RoI-embedding shard, in order")
    prs.add_argument("--shard", type=int, required=True)
    prs.add_argument("--num-shards", type=int, required=True)
    prs.add_argument("--ratio", type=float, default=0.1, help="pairs per neighbour = max(1, int(ratio * query RoIs))")
    prs.add_argument("--out", required=True, help="pairs shard (.npz)")
    mrg = orl_sub.add_parser("merge", help="shards -> one correspondence file, its summary and the pairs figure")
    mrg.add_argument("--knn", required=True)
    mrg.add_argument("--proposals", nargs="+", required=True)
    mrg.add_argument("--pairs", nargs="+", required=True)
    mrg.add_argument("--settings", default="{}", help="JSON of the stage-2 settings, recorded in the file")
    mrg.add_argument("--out", required=True, help="correspondence file (.npz), orl.correspondence of stage 3")
    mrg.add_argument("--summary", required=True, help="summary JSON (counts per image, similarity histogram)")
    mrg.add_argument("--figure", default=None, help="PNG of the top-ranked cross-image pairs")

    # ---- export ----
    ib = sub.add_parser("import-baseline", help="turn pretrained weights (official, timm, export) into a baseline run checkpoint")
    ib.add_argument("--weights", default=None, help="weights file (any format --checkpoint takes)")
    ib.add_argument("--from-catalogue", default=None, metavar="NAME",
                    help="instead of --weights: download (resumable, verified) the released checkpoint NAME of "
                         "--catalogue into --downloads, then import it with the catalogue's method and pretraining data")
    ib.add_argument("--catalogue", default="config/checkpoints.yaml", help="checkpoint catalogue (default %(default)s)")
    ib.add_argument("--downloads", default="resources/checkpoints", help="download folder (default %(default)s)")
    ib.add_argument("--url", default=None, help="with --from-catalogue: fetch from this URL instead (mirror, file:)")
    ib.add_argument("--timm-model", default=None, help="timm architecture of bare weights (e.g. vit_small_patch14_reg4_dinov2)")
    ib.add_argument("--method", default=None, help="method name the tables use (e.g. dino, ibot, mae, dinov2r)")
    ib.add_argument("--pretrain-data", default=None, help="what it was pretrained on (e.g. imagenet), matched by the paper tables")
    ib.add_argument("--output-dir", required=True, help="folder for checkpoint.pth")

    fc = sub.add_parser("fetch-checkpoint", help="download a released checkpoint of the catalogue by name (resumable, verified)")
    fc.add_argument("name", help="catalogue name, e.g. cribo_vits16_coco (see config/checkpoints.yaml)")
    fc.add_argument("--catalogue", default="config/checkpoints.yaml", help="checkpoint catalogue (default %(default)s)")
    fc.add_argument("--downloads", default="resources/checkpoints", help="download folder (default %(default)s)")
    fc.add_argument("--url", default=None, help="fetch from this URL instead (a mirror, or a local file: URL)")
    ib.add_argument("--summary", default=None, help="also write a JSON summary here (the DAG's completion marker)")

    iw = sub.add_parser("init-weights", help="write randomly initialised ResNet weights (the 'Random' baseline)")
    iw.add_argument("--arch", default="resnet50", help="resnet_tiny, resnet18, resnet34, resnet50, resnet101, resnet152")
    iw.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    iw.add_argument("--out", required=True, help="output .pth (torchvision key layout)")

    exp = sub.add_parser("export", help="write a slim evaluation checkpoint (teacher backbone, safetensors)")
    exp.add_argument("--checkpoint", required=True, help="training checkpoint (ours or official CrIBo/DINO)")
    exp.add_argument("--out", required=True, help="output file, *.safetensors")

    # ---- extract ----
    ex = sub.add_parser("extract", help="write a frozen backbone's patch features of one split to disk")
    ex.add_argument("--checkpoint", required=True,
                    help="ours (`cribo train`/`cribo export`), an official CrIBo/DINO checkpoint, or ViT weights (see --timm-model)")
    ex.add_argument("--split", required=True, help="split list name, e.g. train, trainaug or val")
    ex.add_argument("--out", required=True, help="output folder (feature store)")
    ex.add_argument("--passes", type=positive_int, default=1,
                    help="passes over the split (the in-context memory protocol uses 2 augmented passes)")
    ex.add_argument("--augment", action="store_true",
                    help="augment each pass (colour jitter + random resized crop, seeded per image and pass)")
    ex.add_argument("--protocol", dest="preprocessing", default="clean", choices=["clean", "open-hbird"],
                    help="input preprocessing: clean (bicubic resize, ImageNet std; default) or open-hbird "
                         "(bilinear resize, open-hummingbird-eval's std 0.255), for `eval incontext --protocol`")
    ex.add_argument("--shard-images", type=positive_int, default=2048,
                    help="images per resumable shard (default 2048)")
    _add_common_eval(ex)

    eg = sub.add_parser("extract-global",
                        help="write one L2-normalised descriptor per image with its image-level labels (SVM protocols)")
    eg.add_argument("--checkpoint", required=True, help="any format --checkpoint takes (ViT or ResNet)")
    eg.add_argument("--split", required=True, help="split, e.g. trainval or test (voc2007), train or val (toyscenes)")
    eg.add_argument("--out", required=True, help="output folder (image-level feature store)")
    _add_common_eval(eg)

    # ---- eval ----
    ev = sub.add_parser("eval", help="evaluate a checkpoint with a dense protocol")
    ev_sub = ev.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    ic = ev_sub.add_parser("incontext", help="in-context retrieval (Hummingbird dense nearest neighbours)")
    ic.add_argument("--checkpoint", required=True, help="checkpoint written by `cribo train`")
    ic.add_argument("--out", required=True,
                    help="output JSON row (mIoU in percent under 'miou'); with several fractions or seeds a "
                         "path holding '{fraction}' and '{seed}', one row each")
    ic.add_argument("--train-features", default=None,
                    help="feature store of the memory split from `cribo extract` (else extracted now)")
    ic.add_argument("--val-features", default=None,
                    help="feature store of the query split from `cribo extract` (else extracted now)")
    ic.add_argument("--k", type=positive_int, default=30, help="neighbours per query patch (default 30)")
    ic.add_argument("--temperature", type=float, default=0.02,
                    help="softmax temperature over neighbour similarities (default 0.02)")
    ic.add_argument("--memory-size", type=int, default=None,
                    help="memory entries (patches) kept, split evenly over images by rarity; default: all")
    ic.add_argument("--fraction", type=float, nargs="+", default=[1.0],
                    help="fraction(s) of training images in memory (default 1); several fractions (or seeds) "
                         "share one load of the feature stores, and --out then holds '{fraction}' and '{seed}'")
    ic.add_argument("--seed", type=int, nargs="+", default=[0],
                    help="seed(s) of the fraction subset and memory sampling (default 0); a full memory "
                         "(fraction 1, no --memory-size) draws nothing and runs with the first seed only")
    ic.add_argument("--index", default="exact", choices=["exact", "ivfpq"],
                    help="exact search (default; on the GPU when there is one) or approximate IVF-PQ for huge memories")
    ic.add_argument("--train-list", default=None,
                    help="file of memory image ids (one per line) instead of a seeded random --fraction")
    ic.add_argument("--list-dir", default=None,
                    help="folder of such files in the open-hummingbird-eval layout (1_div_<D>/...<seed>...txt): "
                         "the file for --fraction 1/D and --seed is used")
    ic.add_argument("--protocol", dest="incontext_protocol", default="clean", choices=["clean", "open-hbird"],
                    help="clean (default): ignored pixels left out of the memory labels, ImageNet std, identity-mapped "
                         "mIoU; open-hbird: open-hummingbird-eval's choices (ignored pixels as class 0 in the memory, "
                         "std 0.255, bilinear resizing, Hungarian mIoU over all classes), to compare with numbers "
                         "published through it")
    ic.add_argument("--experiment", default=None, help="experiment name recorded in the row")
    ic.add_argument("--run-name", default=None, help="run name recorded in the row")
    _add_common_eval(ic)

    li = ev_sub.add_parser("linear", help="linear segmentation probe on the frozen backbone (leopart or mmseg protocol)")
    li.add_argument("--checkpoint", required=True, help="checkpoint to evaluate (any format --checkpoint takes)")
    li.add_argument("--protocol", dest="linear_protocol", default="leopart", choices=["leopart", "mmseg"],
                    help="leopart: 448 px, 1x1 conv, logits at 100x100, SGD lr 0.01, 25 epochs, drop at 20; "
                         "mmseg: 512 crops of random resizes 0.5-2, 1x1 conv, Adam + poly lr, iterations, "
                         "sliding-window inference 512/480 scored at the original resolution")
    li.add_argument("--epochs", type=positive_int, default=25, help="[leopart] training epochs (default 25)")
    li.add_argument("--drop-at", type=int, default=20, help="[leopart] epoch at which the lr is divided by 10 (default 20)")
    li.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01, both protocols)")
    li.add_argument("--mask-size", type=positive_int, default=100, help="[leopart] side of the logits and scored masks (default 100)")
    li.add_argument("--seed", type=int, default=400, help="seed of the head and the data order (default 400)")
    _add_dense_args(li, optimizer="adam", weight_decay=0.01, iterations=80000)
    li.add_argument("--out", required=True, help="output JSON row")
    li.add_argument("--experiment", default=None, help="experiment name recorded in the row")
    li.add_argument("--run-name", default=None, help="run name recorded in the row")
    _add_common_eval(li)

    ft = ev_sub.add_parser("finetune", help="end-to-end fine-tuning: backbone unfrozen, Segmenter mask or linear decoder")
    ft.add_argument("--checkpoint", required=True, help="checkpoint to fine-tune (any format --checkpoint takes)")
    ft.add_argument("--decoder", default="mask", choices=["mask", "linear"],
                    help="mask: Segmenter mask transformer (2 layers); linear: 1x1 conv (default mask)")
    ft.add_argument("--lr", type=float, default=1e-3, help="base learning rate (default 1e-3, the Segmenter configs)")
    ft.add_argument("--layer-decay", type=float, default=1.0,
                    help="layer-wise lr decay over the backbone blocks (default 1.0 = off; 0.65 is iBOT's)")
    ft.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the backbone (default 0.1)")
    ft.add_argument("--decoder-layers", type=positive_int, default=2, help="mask transformer layers (default 2)")
    ft.add_argument("--seed", type=int, default=0, help="seed of the decoder and the data order (default 0)")
    _add_dense_args(ft, optimizer="adam", weight_decay=0.0, iterations=80000)
    ft.add_argument("--out", required=True, help="output JSON row")
    ft.add_argument("--experiment", default=None, help="experiment name recorded in the row")
    ft.add_argument("--run-name", default=None, help="run name recorded in the row")
    _add_common_eval(ft)

    oc = ev_sub.add_parser("overcluster", help="k-means overclustering of frozen validation features (Leopart protocol)")
    oc.add_argument("--checkpoint", required=True, help="checkpoint whose features the store holds")
    oc.add_argument("--val-features", required=True, help="feature store of the validation split (`cribo extract`)")
    oc.add_argument("--clusters", required=True, nargs="+",
                    help="K: an integer >= the number of classes, or 'classes' (K = number of classes, Hungarian); "
                         "several values share one load of the store, --out then holds '{clusters}'")
    oc.add_argument("--seeds", type=positive_int, default=5, help="k-means seeds 0..S-1, results averaged (default 5)")
    oc.add_argument("--pca-dim", type=positive_int, default=50, help="PCA dimensions after standardisation (default 50)")
    oc.add_argument("--iterations", type=positive_int, default=100, help="k-means iterations (default 100)")
    oc.add_argument("--restarts", type=positive_int, default=5, help="k-means restarts, best objective kept (default 5)")
    oc.add_argument("--out", required=True, help="output JSON row ('{clusters}' in it is replaced by each K)")
    oc.add_argument("--experiment", default=None, help="experiment name recorded in the row")
    oc.add_argument("--run-name", default=None, help="run name recorded in the row")

    sv = ev_sub.add_parser("svm", help="VOC07 SVM classification: one linear SVM per class, cost by 3-fold CV AP")
    sl = ev_sub.add_parser("svm-lowshot", help="VOC07 low-shot SVMs: k positives and 19k negatives per class, 5 samples")
    for p in (sv, sl):
        p.add_argument("--checkpoint", required=True, help="checkpoint whose features the stores hold")
        p.add_argument("--train-features", required=True, help="trainval store (`cribo extract-global`)")
        p.add_argument("--test-features", required=True, help="test store (`cribo extract-global`)")
        p.add_argument("--folds", type=int, default=3, help="cross-validation folds of the cost selection (default 3)")
        p.add_argument("--workers", type=int, default=1, help="processes fitting SVMs in parallel (default 1)")
        p.add_argument("--out", required=True, help="output JSON row")
        p.add_argument("--experiment", default=None, help="experiment name recorded in the row")
        p.add_argument("--run-name", default=None, help="run name recorded in the row")
    sl.add_argument("--k", type=int, required=True, help="positives per class (the protocol: 1 2 4 8 16 32 64 96)")
    sl.add_argument("--selection", default="test", choices=["test", "cv"],
                    help="test: the official cost selection on the test mAP (flagged in the row); "
                         "cv: each class's cost by cross-validation on its own sample")
    sl.add_argument("--samples", type=int, default=5, help="random training sets per k (default 5)")
    sl.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")

    de = ev_sub.add_parser("detect", help="COCO detection + instance segmentation: Mask R-CNN R50-FPN v2 (1x) from a ResNet-50")
    de.add_argument("--checkpoint", required=True, help="a checkpoint holding a ResNet-50 (ours or imported)")
    de.add_argument("--train-ann", required=True, help="COCO instances JSON of the training split")
    de.add_argument("--val-ann", required=True, help="COCO instances JSON of the validation split")
    de.add_argument("--train-images", required=True, help="folder the training file_names are relative to")
    de.add_argument("--val-images", required=True, help="folder the validation file_names are relative to")
    de.add_argument("--iterations", type=int, default=90000, help="training iterations (default 90000: 1x)")
    de.add_argument("--batch-size", type=int, default=16, help="images per iteration (default 16)")
    de.add_argument("--lr", type=float, default=0.02, help="base learning rate (default 0.02 at batch 16)")
    de.add_argument("--steps", type=int, nargs="*", default=[60000, 80000], help="iterations where lr /= 10")
    de.add_argument("--warmup", type=int, default=1000, help="linear warm-up iterations (default 1000)")
    de.add_argument("--min-size", type=int, nargs="+", default=[640, 672, 704, 736, 768, 800],
                    help="training short sides, one drawn per batch (default 640-800 step 32)")
    de.add_argument("--test-size", type=int, default=800, help="test short side (default 800)")
    de.add_argument("--max-size", type=int, default=1333, help="long-side cap (default 1333)")
    de.add_argument("--rpn-batch-per-image", type=positive_int, default=256,
                    help="anchors sampled per image for the RPN losses (default 256)")
    de.add_argument("--roi-batch-per-image", type=positive_int, default=512,
                    help="proposals sampled per image for the box and mask heads' losses (default 512)")
    de.add_argument("--proposals-train", type=positive_int, default=2000,
                    help="RPN proposals kept per image in training, before NMS (per FPN level) and after (default 2000)")
    de.add_argument("--proposals-test", type=positive_int, default=1000,
                    help="the same at test (default 1000); the toy's 64 px scenes need far fewer than COCO")
    de.add_argument("--seed", type=int, default=0, help="seed of the heads, data order and scales (default 0)")
    de.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    de.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                    help="processes (GPUs) on this node; N > 1 relaunches under torchrun --standalone (SyncBN on "
                         "GPUs; --batch-size stays the global batch); under srun, one task per GPU")
    de.add_argument("--checkpoint-every", type=int, default=1000,
                    help="iterations between resumable state saves next to --out (default 1000)")
    de.add_argument("--no-progress", action="store_true", help="hide progress bars")
    de.add_argument("--out", required=True, help="output JSON row")
    de.add_argument("--experiment", default=None, help="experiment name recorded in the row")
    de.add_argument("--run-name", default=None, help="run name recorded in the row")

    cl = ev_sub.add_parser("classify", help="ImageNet-style classification: linear on frozen features, or semi-supervised "
                                            "fine-tuning on a subset list (user-provided ImageFolder data)")
    cl.add_argument("--checkpoint", required=True, help="any format --checkpoint takes")
    cl.add_argument("--data-root", required=True, help="folder with train/<class>/ and val/<class>/ (ImageNet, Places205, iNat18)")
    cl.add_argument("--dataset", default="imagenet", help="name recorded in the row (imagenet, places205, inat18)")
    cl.add_argument("--mode", required=True, choices=["linear", "semi"])
    cl.add_argument("--subset-list", default=None,
                    help="[semi] the labelled training images: 1percent or 10percent (SimCLR's official lists, "
                         "downloaded into --downloads and verified) or the path of a list file")
    cl.add_argument("--downloads", default="resources/downloads", help="[semi] folder of the official lists (default %(default)s)")
    cl.add_argument("--mirror", default=None, help="[semi] fetch <MIRROR>/<filename> instead of the official list's URL")
    cl.add_argument("--epochs", type=int, default=None, help="default: linear 28 (ImageNet), semi 20")
    cl.add_argument("--steps", type=int, nargs="*", default=None, help="epochs where the lr drops (linear 8 16 24, semi 12 16)")
    cl.add_argument("--lr", type=float, default=None, help="default: linear 0.01; semi one of the grid 0.001/0.01/0.1 (0.01)")
    cl.add_argument("--head-lr-mult", type=float, default=1.0, help="[semi] head lr multiplier (grid 1/10/100)")
    cl.add_argument("--weight-decay", type=float, default=None,
                    help="default: linear 1e-4; semi 5e-4 with --subset-list 1percent, else 1e-4 (the official grid)")
    cl.add_argument("--batch-size", type=int, default=256, help="default 256")
    cl.add_argument("--image-size", type=int, default=224, help="crop side (default 224)")
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    cl.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                    help="processes (GPUs) on this node; N > 1 relaunches under torchrun --standalone (DDP, SyncBN on "
                         "GPUs; --batch-size stays the global batch); under srun, one task per GPU")
    cl.add_argument("--num-workers", type=int, default=0)
    cl.add_argument("--no-progress", action="store_true")
    cl.add_argument("--timm-model", default=None, help="timm architecture of bare ViT weights")
    cl.add_argument("--out", required=True, help="output JSON row")
    cl.add_argument("--experiment", default=None)
    cl.add_argument("--run-name", default=None)

    # ---- figures ----
    fg = sub.add_parser("figures", help="PNG figures: in-context predictions and cross-image object matches")
    fg.add_argument("--checkpoint", required=True, help="checkpoint whose features the stores hold")
    fg.add_argument("--train-features", required=True, help="memory feature store (`cribo extract`)")
    fg.add_argument("--val-features", required=True, help="query feature store (`cribo extract`)")
    fg.add_argument("--out-dir", required=True, help="folder for incontext.png and objects.png")
    fg.add_argument("--num-images", type=positive_int, default=4, help="validation images shown (default 4)")
    fg.add_argument("--memory-images", type=positive_int, default=32, help="training images whose objects are matched (default 32)")
    fg.add_argument("--k", type=positive_int, default=30, help="neighbours of the in-context retrieval (default 30)")
    fg.add_argument("--temperature", type=float, default=0.02, help="retrieval temperature (default 0.02)")
    _add_common_eval(fg)

    # ---- table ----
    tb = sub.add_parser("table", help="build results tables (CSV + Markdown) from JSON rows")
    tb.add_argument("--rows", nargs="+", required=True, help="row files or folders searched recursively")
    tb.add_argument("--out", required=True, help="output folder, e.g. results/tables")
    tb.add_argument("--ablation-base", default=None,
                    help="base run of the ablation grid: ablations.{csv,md} compare the runs named <base>~<key>=<value> with it")
    tb.add_argument("--paper", default=None,
                    help="published numbers (config/paper_results.yaml): also write paper_<protocol>.{csv,md}")

    # ---- curves ----
    cu = sub.add_parser("curves", help="training curves of several runs as one TSV (one column per run), for dvc plots")
    cu.add_argument("--runs", nargs="+", required=True, metavar="NAME=PRETRAIN_DIR",
                    help="run name and its pretrain folder (holding log_steps.jsonl)")
    cu.add_argument("--metric", default="loss", help="logged quantity to plot (default: loss)")
    cu.add_argument("--out", required=True, help="output TSV")
    cu.add_argument("--png", default=None, help="also draw the curves into this PNG")
    return parser


def cmd_data(args) -> None:
    if args.data_command == "list":
        from cribo.data.registry import known_datasets

        print("\n".join(known_datasets()))
        return
    if args.data_command == "download" and args.name == "imagenet-subsets":
        from cribo.data.registry import IMAGENET_SUBSETS
        from cribo.eval.classification import resolve_subset_list

        for name in IMAGENET_SUBSETS:  # for clusters whose compute nodes have no internet
            print(f"{name}: {resolve_subset_list(name, args.downloads, args.mirror, progress=not args.no_progress)}")
        return
    if args.data_command == "download":
        from cribo.data.fetch import fetch_dataset

        for folder in fetch_dataset(args.name, args.downloads, args.raw, mirror=args.mirror,
                                    remove_archive=args.remove_archives, retries=args.retries,
                                    progress=not args.no_progress):
            print(f"extracted: {folder}")
        return
    if args.data_command == "prepare":
        from cribo.data.prepare import prepare

        start = time.time()
        info = prepare(args.name, args.raw, args.out, workers=args.workers, progress=not args.no_progress,
                       force=args.force)
        print(f"{args.name} prepared in {args.out} ({time.time() - start:.1f} s): {json.dumps(info)}")
        return
    if args.data_command == "toy-folder":
        from cribo.data.toy_classification import write_image_folder

        summary = write_image_folder(args.toy_root, args.out, percents=args.percents)
        print(f"toy classification set in {args.out}: {json.dumps(summary['images'])}")
        return
    if args.data_command == "check":
        from cribo.data.user_provided import check_cityscapes, check_imagenet

        check = check_imagenet if args.name == "imagenet" else check_cityscapes
        counts = check(args.root, expect_counts=not args.no_count_check)
        if args.out:
            from cribo.config import atomic_write_text

            atomic_write_text(args.out, json.dumps(counts, indent=1) + "\n")
        print(f"{args.name} at {args.root}: complete {json.dumps(counts)}")
        return
    from cribo.data.toyscenes import generate

    start = time.time()
    generate(args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
             seed=args.seed, workers=args.workers)
    print(f"toyscenes written to {args.out} in {time.time() - start:.1f} s")


def cmd_config(args) -> None:
    from cribo.config import load_yaml, resolve_runs, run_id, write_run_config

    runs = resolve_runs(load_yaml(args.config), args.config)
    if args.config_command == "runs":
        for name, cfg in runs.items():
            print(f"{name}\t{run_id(cfg)}\t{cfg['method']}")
        return
    if args.run not in runs:
        raise KeyError(f"run {args.run!r} is not in {args.config}; runs: {', '.join(runs)}")
    write_run_config(runs[args.run], args.out)


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by ``torchrun --standalone`` running the same command ``nproc`` times."""
    import os

    rest, skip = [], False
    for arg in argv:  # drop --nproc-per-node so the children do not relaunch again
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cribo.cli", *rest]
    print("launching: " + " ".join(command), flush=True)
    os.execv(sys.executable, command)


def _warn_released_batch(note: dict) -> None:
    released, mine = note["released"], note["this_run"]
    print("=" * 78 + "\n"
          f"WARNING: this released config was trained on {released['world_size']} processes x "
          f"{released['batch_size']} images = {released['total_batch']}; this run uses {mine['world_size']} x "
          f"{mine['batch_size']} = {mine['total_batch']}.\n"
          f"Different: {'; '.join(note['differs'])}.\n"
          "The per-process batch is kept (set it with --set optim.batch_size=N); results are not the "
          "paper's setting. Recorded in provenance.json under 'released_batch'.\n" + "=" * 78,
          file=sys.stderr, flush=True)


def _record_in_provenance(path: Path, key: str, value: dict) -> None:
    """Add ``key`` to the provenance the engine wrote (it rewrites the file on every start, so the
    note is added once training returns)."""
    from cribo.config import atomic_write_text

    record = json.loads(path.read_text()) if path.is_file() else {}
    record[key] = value
    atomic_write_text(path, json.dumps(record, indent=2))


def cmd_train(args) -> None:
    import os

    from cribo.config import ConfigError, load_yaml, released_batch_note, resolve_runs, run_id, validate_with_overrides
    from cribo.train.distributed import read_launch_env
    from cribo.train.engine import train

    raw = load_yaml(args.config)
    if "runs" in raw:
        if args.run is None:
            raise ConfigError(f"{args.config} is a workflow config; pick a run with --run "
                              f"({', '.join(raw['runs'])})")
        raw = resolve_runs(raw, args.config)[args.run]
    elif args.run is not None:
        raise ConfigError(f"--run given but {args.config} has no 'runs' section")
    cfg = validate_with_overrides(raw, args.overrides, args.config)
    launch = read_launch_env()
    if args.nproc_per_node > 1 and launch.launcher == "single":
        _relaunch_under_torchrun(args.nproc_per_node, args.argv)
    if args.nproc_per_node > 1 and launch.world_size == 1 and "RANK" in os.environ:
        raise ConfigError("--nproc-per-node > 1 inside a torchrun job of one process; launch either way, not both")
    batch_note = released_batch_note(cfg, launch.world_size, overridden=any(
        o.split("=", 1)[0].strip() == "optim.batch_size" for o in args.overrides or []))
    if launch.rank == 0:
        print(f"run id {run_id(cfg)}: method {cfg['method']}, output {args.output_dir}", flush=True)
        if batch_note:
            _warn_released_batch(batch_note)
    started = time.time()
    path = train(cfg, args.output_dir)
    if launch.rank != 0:  # rank 0 reports and writes the completion marker
        return
    if batch_note:
        _record_in_provenance(Path(args.output_dir) / "provenance.json", "released_batch", batch_note)
    print(f"checkpoint: {path}")
    if args.summary:
        from cribo.config import atomic_write_text
        from cribo.train.checkpoint import file_sha256

        summary = {"run_id": run_id(cfg), "method": cfg["method"], "checkpoint": str(path),
                   "checkpoint_sha256": file_sha256(path), "wall_time_s": round(time.time() - started, 1)}
        atomic_write_text(args.summary, json.dumps(summary, indent=1) + "\n")


def _load_eval_backbone(args, device=None):
    from cribo.models.backbones import backbone_from_checkpoint
    from cribo.train.checkpoint import load_checkpoint
    from cribo.train.distributed import pick_device

    ckpt = load_checkpoint(args.checkpoint)
    backbone = backbone_from_checkpoint(ckpt, args.checkpoint, timm_model=getattr(args, "timm_model", None))
    device = device if device is not None else pick_device(args.device)
    size = args.image_size or backbone.default_img_size
    ckpt.setdefault("method", backbone.source_method)
    return backbone.to(device), ckpt, device, size


def cmd_import_baseline(args) -> None:
    from cribo.config import atomic_write_text
    from cribo.train.baseline import import_baseline

    weights, method, pretrain, timm_model = args.weights, args.method, args.pretrain_data, args.timm_model
    if args.from_catalogue:
        from cribo.models.catalogue import fetch_checkpoint, get_entry, load_catalogue

        catalogue = load_catalogue(args.catalogue)
        entry = get_entry(catalogue, args.from_catalogue)
        weights = fetch_checkpoint(catalogue, args.from_catalogue, args.downloads, url=args.url,
                                   progress=not getattr(args, "no_progress", False))
        method, pretrain = method or entry["method"], pretrain or entry["pretrain"]
        timm_model = timm_model or entry.get("timm_model")
    if weights is None or method is None:
        raise ValueError("import-baseline needs --weights and --method, or --from-catalogue NAME")
    summary = import_baseline(weights, args.output_dir, method=method, pretrain=pretrain, timm_model=timm_model)
    if args.summary:
        atomic_write_text(args.summary, json.dumps(summary, indent=1) + "\n")
    print(f"baseline {args.method} imported -> {summary['checkpoint']}")


def cmd_fetch_checkpoint(args) -> None:
    from cribo.models.catalogue import fetch_checkpoint, load_catalogue

    path = fetch_checkpoint(load_catalogue(args.catalogue), args.name, args.downloads, url=args.url)
    print(f"{args.name} -> {path}")


def cmd_init_weights(args) -> None:
    from cribo.models.backbones import save_random_resnet

    save_random_resnet(args.arch, args.seed, args.out)
    print(f"random {args.arch} (seed {args.seed}) -> {args.out}")


def cmd_export(args) -> None:
    from cribo.train.export import export_backbone

    path = export_backbone(args.checkpoint, args.out)
    print(f"backbone exported to {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def cmd_extract(args) -> None:
    from cribo.data.registry import get_spec
    from cribo.eval.features import extract_to_disk, load_store
    from cribo.train.checkpoint import file_sha256

    spec = get_spec(args.dataset, args.data_root)
    backbone, ckpt, device, size = _load_eval_backbone(args)
    extract_to_disk(backbone, spec, args.data_root, args.split, size, args.out, batch_size=args.batch_size,
                    device=device, num_workers=args.num_workers, passes=args.passes, augment=args.augment,
                    shard_images=args.shard_images, progress=not args.no_progress, preprocessing=args.preprocessing,
                    extra_meta={"checkpoint": args.checkpoint, "checkpoint_sha256": file_sha256(args.checkpoint),
                                "method": ckpt["method"]})
    print(f"features {load_store(args.out).features.shape} written to {args.out}")


def cmd_extract_global(args) -> None:
    from cribo.data.registry import get_spec
    from cribo.data.voc07 import multilabel_set
    from cribo.eval.global_features import extract_global, write_global_store
    from cribo.train.checkpoint import file_sha256

    spec = get_spec(args.dataset, args.data_root)
    images = multilabel_set(spec, args.data_root, args.split)
    backbone, ckpt, device, size = _load_eval_backbone(args)
    features = extract_global(backbone, images, size, args.batch_size, device, args.num_workers,
                              progress=not args.no_progress)
    descriptor = "cls+mean_patch" if getattr(backbone, "vit", None) is not None else \
        f"{getattr(backbone, 'feature_map', 'map')} avg-pooled to 2x2"
    write_global_store(args.out, features, images, {
        "dataset": spec.name, "split": args.split, "image_size": size, "descriptor": descriptor,
        "checkpoint": args.checkpoint, "checkpoint_sha256": file_sha256(args.checkpoint), "method": ckpt["method"]})
    print(f"image features {features.shape} ({descriptor}) written to {args.out}")


def cmd_svm(args) -> None:
    from cribo.eval.global_features import load_global_store
    from cribo.eval.protocol import make_row, write_row
    from cribo.eval.svm import lowshot_benchmark, svm_benchmark
    from cribo.train.checkpoint import file_sha256, load_checkpoint

    started = time.time()
    train_x, train_y, train_meta = load_global_store(args.train_features)
    test_x, test_y, test_meta = load_global_store(args.test_features)
    if train_meta["dataset"] != test_meta["dataset"] or train_meta["class_names"] != test_meta["class_names"]:
        raise ValueError(f"{args.train_features} ({train_meta['dataset']}) and {args.test_features} "
                         f"({test_meta['dataset']}) hold different datasets or classes")
    if args.protocol == "svm":
        result = svm_benchmark(train_x, train_y, test_x, test_y, folds=args.folds, workers=args.workers)
    else:
        result = lowshot_benchmark(train_x, train_y, test_x, test_y, args.k, args.selection, samples=args.samples,
                                   seed=args.seed, workers=args.workers)
    result.update(image_size=test_meta["image_size"], descriptor=test_meta["descriptor"],
                  feature_dim=int(test_x.shape[1]), train_split=train_meta["split"], seed=getattr(args, "seed", None))
    ckpt = load_checkpoint(args.checkpoint)
    row = make_row(args.protocol.replace("-", "_"), result, checkpoint=args.checkpoint,
                   checkpoint_sha256=file_sha256(args.checkpoint), checkpoint_cfg=ckpt.get("config"),
                   dataset=test_meta["dataset"], split=test_meta["split"], class_names=test_meta["class_names"],
                   experiment=args.experiment, run_name=args.run_name, started=started)
    write_row(row, args.out)
    extra = f" +- {row['map_std']:.2f} (k={args.k}, cost selected on {args.selection})" if args.protocol != "svm" else ""
    print(f"{args.protocol} mAP {row['map']:.2f}{extra} -> {args.out}")


def cmd_detect(args) -> None:
    import torch

    from cribo.eval import detection
    from cribo.eval.protocol import make_row, write_row
    from cribo.train.checkpoint import file_sha256, load_checkpoint
    from cribo.train.distributed import barrier, cleanup, init_distributed, read_launch_env

    started = time.time()
    launch = read_launch_env()
    if args.nproc_per_node > 1 and launch.launcher == "single":
        if args.batch_size % args.nproc_per_node:
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) does not split over "
                             f"--nproc-per-node {args.nproc_per_node} processes")
        _relaunch_under_torchrun(args.nproc_per_node, args.argv)
    ckpt = load_checkpoint(args.checkpoint)
    state = detection.resnet50_state_from_checkpoint(ckpt, args.checkpoint)
    train = detection.CocoInstances(args.train_ann, args.train_images, train=True)
    val = detection.CocoInstances(args.val_ann, args.val_images, train=False)
    if train.category_ids != val.category_ids:
        raise ValueError(f"{args.train_ann} and {args.val_ann} have different categories")
    info = init_distributed(args.device)
    torch.manual_seed(args.seed)  # the heads' initialisation (the same in every process)
    sampling = {"rpn_batch_per_image": args.rpn_batch_per_image, "roi_batch_per_image": args.roi_batch_per_image,
                "proposals_train": args.proposals_train, "proposals_test": args.proposals_test}
    model = detection.build_detector(len(train.category_ids), state, min_size=tuple(args.min_size),
                                     test_size=args.test_size, max_size=args.max_size,
                                     **detection.sampling_kwargs(**sampling))
    detector, device = model, info.device
    if info.world_size > 1:
        # SyncBN needs GPUs (torch refuses it on CPU): CPU processes keep per-process batch statistics
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            detector = model
        model = torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    trained = detection.train_detector(model, train, iterations=args.iterations, batch_size=args.batch_size,
                                       lr=args.lr, steps=tuple(args.steps), warmup=args.warmup, seed=args.seed,
                                       device=device, state_path=f"{args.out}.state.pth",
                                       checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                                       rank=info.rank, world_size=info.world_size)
    barrier()
    cleanup()  # the other processes leave here; rank 0 evaluates (the weights are identical) and writes the row
    if not info.is_main:
        return
    metrics = detection.evaluate_detector(detector, val, device, progress=not args.no_progress)
    result = {**metrics, **trained, "batch_size": args.batch_size, "lr": args.lr, "steps": args.steps,
              "warmup": args.warmup, "min_size": args.min_size, "test_size": args.test_size, "seed": args.seed,
              **sampling, "detector": "maskrcnn_resnet50_fpn_v2", "image_size": args.test_size, "device": str(device),
              "world_size": info.world_size,
              "sync_bn": info.world_size > 1 and device.type == "cuda"}
    row = make_row("detect", result, checkpoint=args.checkpoint, checkpoint_sha256=file_sha256(args.checkpoint),
                   checkpoint_cfg=ckpt.get("config"), dataset=Path(args.val_ann).stem, split="val",
                   class_names=[c["name"] for c in val.coco.loadCats(val.category_ids)],
                   experiment=args.experiment, run_name=args.run_name, started=started)
    write_row(row, args.out)
    print(f"detection: box AP {row['AP_bb']:.2f}, mask AP {row['AP_mk']:.2f} "
          f"({trained['seconds_per_iteration']:.2f} s/iteration) -> {args.out}")


def cmd_classify(args) -> None:
    from cribo.eval.classification import train_classifier
    from cribo.eval.protocol import make_row, write_row
    from cribo.train.checkpoint import file_sha256
    from cribo.train.distributed import barrier, cleanup, init_distributed, read_launch_env

    started = time.time()
    linear = args.mode == "linear"
    if linear and args.subset_list:
        raise ValueError("--subset-list belongs to --mode semi (the linear protocol trains on the full train split)")
    if args.batch_size % max(1, args.nproc_per_node):
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) does not split over "
                         f"--nproc-per-node {args.nproc_per_node} processes")
    from cribo.eval.classification import resolve_subset_list

    def subset_file() -> str:
        return str(resolve_subset_list(args.subset_list, args.downloads, args.mirror, progress=not args.no_progress))

    # before the backbone: a wrong name or a failed download stops at once; one process downloads
    # (this one before a torchrun relaunch, or rank 0 under srun), the others then find the verified file
    launch = read_launch_env()
    subset = subset_file() if args.subset_list and launch.rank == 0 else None
    if args.nproc_per_node > 1 and launch.launcher == "single":
        _relaunch_under_torchrun(args.nproc_per_node, args.argv)
    weight_decay = args.weight_decay
    if weight_decay is None:
        weight_decay = 5e-4 if not linear and args.subset_list == "1percent" else 1e-4
    info = init_distributed(args.device)
    if args.subset_list:
        barrier()  # rank 0 has the file
        subset = subset or subset_file()
    backbone, ckpt, device, _ = _load_eval_backbone(args, info.device)
    result = train_classifier(
        backbone, args.data_root, mode=args.mode, epochs=args.epochs if args.epochs is not None else (28 if linear else 20),
        steps=tuple(args.steps if args.steps is not None else ((8, 16, 24) if linear else (12, 16))),
        lr=args.lr if args.lr is not None else 0.01, gamma=0.1 if linear else 0.2,
        weight_decay=weight_decay, batch_size=args.batch_size,
        head_lr_mult=args.head_lr_mult, subset_list=subset, image_size=args.image_size, seed=args.seed,
        device=device, num_workers=args.num_workers, progress=not args.no_progress, rank=info.rank,
        world_size=info.world_size)
    cleanup()
    if result is None:  # not rank 0: rank 0 evaluated and writes the row
        return
    result["seed"] = args.seed
    result["world_size"] = info.world_size
    if subset:
        from cribo.data.registry import IMAGENET_SUBSETS

        result["subset"] = args.subset_list if args.subset_list in IMAGENET_SUBSETS else Path(args.subset_list).stem
        result["subset_sha256"] = file_sha256(subset)
    row = make_row(f"classify_{args.mode}", result, checkpoint=args.checkpoint,
                   checkpoint_sha256=file_sha256(args.checkpoint), checkpoint_cfg=ckpt.get("config"),
                   dataset=args.dataset, split="val", class_names=[], experiment=args.experiment,
                   run_name=args.run_name, started=started)
    write_row(row, args.out)
    print(f"{args.mode} classification: top-1 {row['top1']:.2f}, top-5 {row['top5']:.2f} -> {args.out}")


def cmd_overcluster(args) -> None:
    from cribo.eval.features import check_store_checkpoint, load_store
    from cribo.eval.overclustering import overcluster
    from cribo.eval.protocol import make_row, write_row
    from cribo.train.checkpoint import file_sha256, load_checkpoint

    outputs = _expand_out(args.out, "clusters", args.clusters)
    ckpt = load_checkpoint(args.checkpoint)
    checkpoint_sha256 = file_sha256(args.checkpoint)
    val = load_store(args.val_features)
    check_store_checkpoint(val, args.val_features, args.checkpoint, checkpoint_sha256)
    num_classes = val.meta["num_classes"]
    for value in args.clusters:
        if not (value == "classes" or (value.isdigit() and int(value) >= num_classes)):
            raise ValueError(f"--clusters {value!r}: give 'classes' or an integer >= the {num_classes} classes")
    for value, out in zip(args.clusters, outputs):
        started = time.time()
        clusters = num_classes if value == "classes" else int(value)
        result = overcluster(np.asarray(val.features), np.asarray(val.masks), tuple(val.meta["grid"]), num_classes,
                             clusters, seeds=tuple(range(args.seeds)), pca_dim=args.pca_dim,
                             iterations=args.iterations, restarts=args.restarts, ignore_index=val.meta["ignore_index"])
        row = make_row("overcluster", {**result, "image_size": val.meta["image_size"], "seed": None},
                       checkpoint=args.checkpoint, checkpoint_sha256=checkpoint_sha256,
                       checkpoint_cfg=ckpt.get("config"), dataset=val.meta["dataset"], split=val.meta["split"],
                       class_names=val.meta.get("class_names") or [], experiment=args.experiment,
                       run_name=args.run_name, started=started)
        write_row(row, out)
        print(f"overclustering K={clusters}: mIoU {row['miou']:.2f} +- {row['miou_std']:.2f} -> {out}")


def _expand_rows(template: str, settings: list[tuple[float, int]]) -> list[str]:
    """One in-context row path per (fraction, seed): ``{fraction}`` and ``{seed}`` filled in."""
    if len(settings) > 1 and not ("{fraction}" in template and "{seed}" in template):
        raise ValueError(f"--out {template!r}: several fractions/seeds give several rows, so the path must "
                         "contain '{fraction}' and '{seed}', e.g. rows/f{fraction}-s{seed}.json")
    return [template.replace("{fraction}", str(f)).replace("{seed}", str(s)) for f, s in settings]


def _expand_out(template: str, key: str, values: list) -> list[str]:
    """One output path per value: ``template`` must hold ``{key}`` when there are several values."""
    if len(values) == 1:
        return [template.replace("{" + key + "}", str(values[0]))]
    if "{" + key + "}" not in template:
        raise ValueError(f"--out {template!r}: with several {key} values the path must contain '{{{key}}}' "
                         f"(one row per value), e.g. rows/{key}{{{key}}}.json")
    if len(set(values)) != len(values):
        raise ValueError(f"{key} values repeat: {' '.join(map(str, values))}")
    return [template.replace("{" + key + "}", str(v)) for v in values]


def _dense_kwargs(args, device) -> dict:
    return dict(iterations=args.iterations, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                weight_decay=args.weight_decay, min_lr=args.min_lr, crop=args.crop, stride=args.stride,
                seed=args.seed, device=device, num_workers=args.num_workers, precision=args.precision,
                state_path=f"{args.out}.state.pth", checkpoint_every=args.checkpoint_every,
                progress=not args.no_progress)


def cmd_linear(args) -> None:
    from cribo.data.registry import get_spec
    from cribo.eval.linear import leopart_datasets, mmseg_datasets, train_linear, train_linear_mmseg
    from cribo.eval.protocol import make_row, write_row
    from cribo.train.checkpoint import file_sha256

    started = time.time()
    spec = get_spec(args.dataset, args.data_root)
    backbone, ckpt, device, size = _load_eval_backbone(args)
    if args.linear_protocol == "leopart":
        train, val = leopart_datasets(args.data_root, spec, size)
        result = train_linear(backbone, train, val, spec.num_classes, epochs=args.epochs, drop_at=args.drop_at,
                              lr=args.lr, batch_size=args.batch_size, mask_size=args.mask_size, seed=args.seed,
                              device=device, num_workers=args.num_workers, ignore_index=spec.ignore_index,
                              progress=not args.no_progress)
        result["image_size"] = size
    else:
        train, val = mmseg_datasets(args.data_root, spec, crop=args.crop, scale=args.scale,
                                    normalisation=args.normalisation)
        result = train_linear_mmseg(backbone, train, val, spec.num_classes, ignore_index=spec.ignore_index,
                                    **_dense_kwargs(args, device))
        result.update(image_size=args.crop, scale=list(args.scale), normalisation=args.normalisation)
    row = make_row("linear", result, checkpoint=args.checkpoint,
                   checkpoint_sha256=file_sha256(args.checkpoint), checkpoint_cfg=ckpt.get("config"),
                   dataset=spec.name, split=spec.val_split, class_names=list(spec.class_names),
                   experiment=args.experiment, run_name=args.run_name, started=started)
    write_row(row, args.out)
    print(f"linear ({args.linear_protocol}) mIoU {row['miou']:.2f} -> {args.out}")


def cmd_finetune(args) -> None:
    from cribo.data.registry import get_spec
    from cribo.eval.dense_training import train_dense
    from cribo.eval.finetune import build_finetune_model
    from cribo.eval.linear import mmseg_datasets
    from cribo.eval.protocol import make_row, write_row
    from cribo.train.checkpoint import file_sha256

    started = time.time()
    spec = get_spec(args.dataset, args.data_root)
    backbone, ckpt, device, _ = _load_eval_backbone(args)
    model = build_finetune_model(backbone, spec.num_classes, args.decoder, num_layers=args.decoder_layers,
                                 drop_path=args.drop_path, seed=args.seed)
    train, val = mmseg_datasets(args.data_root, spec, crop=args.crop, scale=args.scale,
                                normalisation=args.normalisation)
    result = train_dense(model, train, val, spec.num_classes, layer_decay=args.layer_decay,
                         ignore_index=spec.ignore_index, **_dense_kwargs(args, device))
    result.update(protocol_name=f"finetune-{args.decoder}", decoder=args.decoder, drop_path=args.drop_path,
                  decoder_layers=args.decoder_layers, image_size=args.crop, scale=list(args.scale),
                  normalisation=args.normalisation)
    row = make_row("finetune", result, checkpoint=args.checkpoint,
                   checkpoint_sha256=file_sha256(args.checkpoint), checkpoint_cfg=ckpt.get("config"),
                   dataset=spec.name, split=spec.val_split, class_names=list(spec.class_names),
                   experiment=args.experiment, run_name=args.run_name, started=started)
    write_row(row, args.out)
    print(f"fine-tuning ({args.decoder} decoder) mIoU {row['miou']:.2f} -> {args.out}")


def cmd_eval(args) -> None:
    if args.protocol in ("svm", "svm-lowshot"):
        return cmd_svm(args)
    if args.protocol == "detect":
        return cmd_detect(args)
    if args.protocol == "classify":
        return cmd_classify(args)
    if args.protocol == "overcluster":
        return cmd_overcluster(args)
    if args.protocol == "linear":
        return cmd_linear(args)
    if args.protocol == "finetune":
        return cmd_finetune(args)
    from cribo.data.registry import get_spec
    from cribo.eval.features import check_store_checkpoint, extract_split, load_store
    from cribo.eval.protocol import make_row, run_incontext, write_row
    from cribo.train.checkpoint import file_sha256, load_checkpoint

    started = time.time()
    from cribo.eval.subsets import incontext_settings

    settings = incontext_settings(args.fraction, args.seed, args.memory_size)
    if args.train_list and len(settings) > 1:
        raise ValueError("--train-list names one memory: give one --fraction and one --seed with it")
    outputs = _expand_rows(args.out, settings)
    spec = get_spec(args.dataset, args.data_root)
    sha256 = file_sha256(args.checkpoint) if Path(args.checkpoint).is_file() else None
    if bool(args.train_features) != bool(args.val_features):
        raise ValueError("give both --train-features and --val-features (or neither, to extract both now)")
    if args.train_features and args.val_features:
        ckpt = load_checkpoint(args.checkpoint)
        train_store, val_store = load_store(args.train_features), load_store(args.val_features)
        check_store_checkpoint(train_store, args.train_features, args.checkpoint, sha256, "--train-features")
        check_store_checkpoint(val_store, args.val_features, args.checkpoint, sha256, "--val-features")
    else:
        backbone, ckpt, device, size = _load_eval_backbone(args)
        extract = lambda split: extract_split(backbone, spec, args.data_root, split, size,  # noqa: E731
                                              batch_size=args.batch_size, device=device,
                                              num_workers=args.num_workers, progress=not args.no_progress,
                                              preprocessing=args.incontext_protocol)
        train_store, val_store = extract(spec.train_split), extract(spec.val_split)
    for store in (train_store, val_store):
        if store.meta["dataset"] != spec.name:
            raise ValueError(f"feature store of dataset {store.meta['dataset']!r} given for --dataset {spec.name}")
    from cribo.eval.subsets import find_list_file, read_id_list

    for (fraction, seed), out in zip(settings, outputs):
        list_file = args.train_list or (find_list_file(args.list_dir, fraction, seed) if args.list_dir else None)
        result = run_incontext(train_store, val_store, fraction=fraction, seed=seed, k=args.k,
                               temperature=args.temperature, memory_size=args.memory_size,
                               train_ids=read_id_list(list_file) if list_file else None, index_kind=args.index,
                               progress=not args.no_progress, protocol=args.incontext_protocol)
        if list_file:
            result["train_list"] = str(list_file)
        row = make_row("incontext", result, checkpoint=args.checkpoint,
                       checkpoint_sha256=sha256, checkpoint_cfg=ckpt.get("config"),
                       dataset=spec.name, split=val_store.meta["split"],
                       class_names=val_store.meta.get("class_names") or list(spec.class_names),
                       experiment=args.experiment, run_name=args.run_name, started=started)
        write_row(row, out)
        started = time.time()
        print(f"in-context mIoU {row['miou']:.2f} ({args.incontext_protocol} protocol; Hungarian "
              f"{row['miou_hungarian']:.2f}) -> {out}")


def cmd_figures(args) -> None:
    import numpy as np
    import torch

    from cribo.data.registry import get_spec
    from cribo.data.segmentation import ResizePair, segmentation_dataset
    from cribo.eval import figures
    from cribo.eval.features import check_store_checkpoint, load_store
    from cribo.models.backbones import PixelPatches
    from cribo.train.checkpoint import file_sha256, load_checkpoint

    spec = get_spec(args.dataset, args.data_root)
    load_checkpoint(args.checkpoint)  # a missing or unreadable checkpoint is reported before any figure
    sha256 = file_sha256(args.checkpoint)
    train, val = load_store(args.train_features), load_store(args.val_features)
    check_store_checkpoint(train, args.train_features, args.checkpoint, sha256, "--train-features")
    check_store_checkpoint(val, args.val_features, args.checkpoint, sha256, "--val-features")
    size = val.meta["image_size"]
    out_dir = Path(args.out_dir)
    shown = list(range(min(args.num_images, val.features.shape[0])))

    def pictures(split, ids):
        data = segmentation_dataset(spec, args.data_root, split, ids=ids)
        return [np.asarray(data[i][0].resize((size, size))) for i in range(len(ids))]

    val_ids = [val.meta["ids"][i] for i in shown]
    preds = figures.incontext_predictions(train, val, shown, k=args.k, temperature=args.temperature)
    path = figures.incontext_figure(pictures(val.meta["split"], val_ids), np.asarray(val.masks)[shown], preds,
                                    spec.num_classes, spec.ignore_index, out_dir / "incontext.png",
                                    title=f"in-context retrieval, k={args.k}, memory: {train.meta['split']}")
    print(f"wrote {path}")
    backbone, ckpt, device, _ = _load_eval_backbone(args)
    if isinstance(backbone, PixelPatches):
        print("objects.png skipped: the checkpoint has no network (pixel baseline)")
        return
    cribo_cfg = (ckpt.get("config") or {}).get("cribo", {})
    k_obj, alpha = cribo_cfg.get("num_clusters", 8), cribo_cfg.get("pos_alpha", 1.0)
    resize = ResizePair(size)

    def objects(split, ids):
        data = segmentation_dataset(spec, args.data_root, split, ids=ids, transform=resize)
        batch = torch.stack([data[i][0] for i in range(len(ids))]).to(device)
        return figures.image_objects(backbone.eval(), batch, k_obj, alpha)

    memory_ids = train.meta["ids"][: args.memory_images]
    q_maps, q_vecs, q_ids = objects(val.meta["split"], val_ids)
    m_maps, m_vecs, m_ids = objects(train.meta["split"], memory_ids)
    matches = [figures.nearest_objects(v, m_vecs) for v in q_vecs]
    path = figures.object_matches_figure(pictures(val.meta["split"], val_ids), q_maps.cpu(), q_ids, matches,
                                         pictures(train.meta["split"], memory_ids), m_maps.cpu(), m_ids,
                                         out_dir / "objects.png")
    print(f"wrote {path}")


def cmd_curves(args) -> None:
    from cribo.results.curves import write_curves

    runs = {}
    for item in args.runs:
        name, sep, folder = item.rpartition("=")  # run names may hold "=" (ablations), folders do not
        if not sep or not name or not folder:
            raise ValueError(f"--runs {item!r}: expected NAME=PRETRAIN_DIR")
        runs[name] = folder
    print(f"curves of {len(runs)} runs -> {write_curves(runs, args.out, args.metric, png=args.png)}")


def cmd_orl(args) -> None:
    from cribo.method import discovery
    from cribo.method.proposals import BoxFilter

    step = args.orl_command
    if step == "knn":
        result = discovery.run_knn(args.checkpoint, args.out, k=args.k, device=args.device)
    elif step == "proposals":
        settings = BoxFilter(args.min_size, args.max_aspect_ratio, args.max_iou, args.top_n)
        result = discovery.run_proposals(args.knn, args.out, args.shard, args.num_shards, settings)
    elif step == "roi-embed":
        result = discovery.run_roi_embeddings(args.checkpoint, args.knn, args.proposals, args.out, device=args.device)
    elif step == "pairs":
        result = discovery.run_pairs(args.knn, args.proposals, args.rois, args.out, args.shard, args.num_shards,
                                     ratio=args.ratio)
    else:
        result = discovery.merge(args.knn, args.proposals, args.pairs, args.out, args.summary, json.loads(args.settings))
        if args.figure:
            from cribo.method.correspondence import load_correspondence

            root = str(np.load(args.knn)["root"])
            discovery.plot_top_pairs(load_correspondence(args.out), root, args.figure)
        result = {k: result[k] for k in ("images", "rois_per_image", "pairs_per_image", "file_bytes")}
    print(f"orl {step}: {json.dumps(result)} -> {args.out}")


def cmd_table(args) -> None:
    from cribo.results.tables import write_tables

    paths = write_tables(args.rows, args.out, ablation_base=args.ablation_base, paper=args.paper)
    print(Path(paths["md"]).read_text(), end="")


COMMANDS = {"data": cmd_data, "config": cmd_config, "train": cmd_train, "import-baseline": cmd_import_baseline,
            "fetch-checkpoint": cmd_fetch_checkpoint, "init-weights": cmd_init_weights,
            "export": cmd_export, "extract": cmd_extract, "extract-global": cmd_extract_global,
            "eval": cmd_eval, "table": cmd_table, "orl": cmd_orl, "curves": cmd_curves, "figures": cmd_figures}


def output_locations(args) -> list[tuple[str, str, str]]:
    """The (option, path, kind) of everything a command will write; checked before it starts."""
    command = args.command
    if command == "data":
        if args.data_command == "download":
            return [("--downloads", args.downloads, "dir"), ("--raw", args.raw, "dir")]
        if args.data_command in ("toyscenes", "prepare"):
            return [("--out", args.out, "dir")]
        if args.data_command == "check":
            return [("--out", args.out, "file")]
        return []
    if command == "config":
        return [("--out", args.out, "file")] if args.config_command == "resolve" else []
    if command in ("train", "import-baseline"):
        return [("--output-dir", args.output_dir, "dir"), ("--summary", args.summary, "file")]
    if command == "fetch-checkpoint":
        return [("--downloads", args.downloads, "dir")]
    if command == "orl":  # every step writes one file; merge also its summary and figure
        return [("--out", args.out, "file"), ("--summary", getattr(args, "summary", None), "file"),
                ("--figure", getattr(args, "figure", None), "file")]
    if command in ("export", "eval", "curves"):
        found = [("--out", args.out, "file")]
        return found + [("--png", args.png, "file")] if command == "curves" else found
    if command in ("extract", "extract-global", "table"):
        return [("--out", args.out, "dir")]
    if command == "init-weights":
        return [("--out", args.out, "file")]
    if command == "figures":
        return [("--out-dir", args.out_dir, "dir")]
    return []


def user_message(err: BaseException) -> str:
    """The one line a user reads: the error's own message, even when a DataLoader worker raised it.

    torch re-raises a worker's exception with the worker's whole traceback as its text; the
    message that names the file is its last line, after the exception's class name.
    """
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if "DataLoader worker process" in message and "Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        name, sep, text = last.partition(": ")
        message = text if sep and name.replace(".", "").replace("_", "").isalnum() else last
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from cribo.config import ConfigError
    from cribo.data.registry import UnknownDatasetError
    from cribo.data.download import DownloadError
    from cribo.data.segmentation import DataError
    from cribo.models.catalogue import CatalogueError
    from cribo.results.paper import PaperResultsError
    from cribo.results.tables import RowError
    from cribo.train.checkpoint import CheckpointLoadError

    from cribo.outputs import check_output_location

    # PermissionError and friends remain possible (a disk that fills up, a race with another
    # process); their text names the path, which is the best that can be said then
    user_errors = (ConfigError, UnknownDatasetError, DataError, RowError, CheckpointLoadError,
                   FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
                   KeyError, ValueError, DownloadError, PaperResultsError, CatalogueError)
    try:
        for option, path, kind in output_locations(args):
            if path:
                check_output_location(path, option, kind)
        COMMANDS[args.command](args)
    except user_errors as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
