"""Run configuration: loading, dotted overrides, schema validation, run ids and provenance.

One run is described by one nested dict validated against ``schemas/run.schema.yaml``; missing
keys get the schema's defaults and unknown keys are errors, because in practice an unknown key is
a typo that would otherwise be silently ignored.

The workflow config (``config/config.yaml``) holds a shared ``pretrain`` block and a ``runs``
mapping of per-run overrides; :func:`resolve_runs` merges them into full run configs and gives
each its *run id*, a short hash of every setting that changes the checkpoint. Artefact paths carry
the run id so that a changed setting can never be served a stale checkpoint (the DVC experiment
pitfall in ``workflow.md`` §2.3).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# Sections of the run config that never change the trained weights: left out of the run id.
NON_ARTEFACT_KEYS = ("train", "released")
# Sections a method never reads, so that tuning one method does not rename another's runs.
METHOD_SECTIONS_IGNORED = {"dino": ("cribo", "byol", "orl"), "cribo": ("byol", "orl"),
                           "byol": ("dino", "cribo", "orl"), "orl": ("dino", "cribo"),
                           "supervised": ("cribo", "byol", "orl")}
# optim keys (and defaults) added with the BYOL/ORL methods; the defaults reproduce the earlier behaviour
OPTIM_KEYS_ADDED = {"optimizer": "adamw", "sgd_momentum": 0.9, "decay_all_parameters": False,
                    "warmup_start_ratio": 0.0}


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the fix."""


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def run_schema() -> dict:
    text = resources.files("cribo").joinpath("schemas/run.schema.yaml").read_text()
    return yaml.safe_load(text)


def _fill_defaults_validator():
    """A Draft 2020-12 validator that also inserts schema defaults into the instance."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _format_error(err: jsonschema.ValidationError, source: str) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        return (f"{source}: unknown key(s) {', '.join(repr(e) for e in extra)} under '{where}'; "
                f"allowed keys there: {', '.join(allowed)}")
    return f"{source}: invalid value at '{where}': {err.message}"


def validate_run_config(cfg: dict, source: str = "config") -> dict:
    """Fill defaults into a copy of ``cfg`` and validate it; raise :class:`ConfigError` on error."""
    cfg = copy.deepcopy(cfg)
    validator = _fill_defaults_validator()(run_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_format_error(errors[0], source))
    # A second pass: defaults filled inside defaults (e.g. sections given as {}) are now checked.
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_format_error(errors[0], source))
    if cfg["method"] == "cribo" and cfg["dino"]["local_crops_number"] > 0:
        # the official CrIBo code builds two global views only; silently dropping local crops would
        # train something else than the user asked for
        raise ConfigError(f"{source}: method cribo has no local crops, but dino.local_crops_number is "
                          f"{cfg['dino']['local_crops_number']}; set it to 0 (or use method: dino)")
    return cfg


def released_batch_note(cfg: dict, world_size: int, overridden: bool = False) -> dict | None:
    """How a launch departs from the released run's batch (``None`` when it does not, or when the
    config is not a released one).

    Policy: the per-process batch (``optim.batch_size``) is kept, so each rank sees what a released
    rank saw (objects entering the bank per step, per-rank cycle-check matching), and the total
    batch, hence the peak lr (``lr x total / 256``) and the bank's fill rate, follow the number of
    processes. ``overridden``: the user set ``optim.batch_size`` explicitly (``--set``).
    """
    released = cfg.get("released")
    if not released:
        return None
    total = cfg["optim"]["batch_size"] * world_size
    released_total = released["batch_size"] * released["world_size"]
    if total == released_total and world_size == released["world_size"]:
        return None
    return {
        "released": {"world_size": released["world_size"], "batch_size": released["batch_size"],
                     "total_batch": released_total, "source": released.get("source")},
        "this_run": {"world_size": world_size, "batch_size": cfg["optim"]["batch_size"], "total_batch": total,
                     "batch_size_set_explicitly": overridden},
        "differs": [what for what, same in (("total batch (peak lr = lr x total / 256, objects enqueued per step)",
                                             total == released_total),
                                            ("per-process batch (per-rank retrieval and cycle check)",
                                             cfg["optim"]["batch_size"] == released["batch_size"]))
                    if not same],
    }


def check_geometry(cfg: dict, source: str = "config") -> None:
    """Relations between keys of a run to be trained that the schema cannot express; raise
    :class:`ConfigError` naming them (called for every run the workflow or ``cribo train`` trains).

    Without these checks the run fails later with an AssertionError deep inside timm, or (for
    ``cribo.num_clusters``) only at the first training step, after the outputs were written.
    """
    from cribo.models.archs import ARCHS

    model = cfg["model"]
    if model["arch"] not in ARCHS and cfg["method"] != "pixels":  # a ResNet: no patches, no heads
        return
    patch, size = model["patch_size"], model["img_size"]
    if size % patch:
        raise ConfigError(f"{source}: model.img_size {size} is not a multiple of model.patch_size {patch}; "
                          f"use e.g. model.img_size={max(patch, size // patch * patch)}")
    if cfg["method"] == "pixels":
        return
    width = model.get("embed_dim") or ARCHS[model["arch"]]["embed_dim"]
    heads = model.get("num_heads") or ARCHS[model["arch"]]["num_heads"]
    if width % heads:
        raise ConfigError(f"{source}: model.embed_dim {width} is not divisible by model.num_heads {heads} "
                          f"(model.arch {model['arch']} gives the values not set); change one of them, "
                          f"e.g. model.num_heads={next(h for h in range(heads, 0, -1) if width % h == 0)}")
    dino = cfg.get("dino") or {}
    if cfg["method"] == "dino" and dino.get("local_crops_number") and dino["local_crop_size"] % patch:
        raise ConfigError(f"{source}: dino.local_crop_size {dino['local_crop_size']} is not a multiple of "
                          f"model.patch_size {patch}; use e.g. dino.local_crop_size="
                          f"{max(patch, dino['local_crop_size'] // patch * patch)}")
    tokens = (size // patch) ** 2
    if cfg["method"] == "cribo" and cfg["cribo"]["num_clusters"] > tokens:
        raise ConfigError(f"{source}: cribo.num_clusters {cfg['cribo']['num_clusters']} is larger than the "
                          f"{tokens} patch tokens of a view (model.img_size {size} / model.patch_size {patch} "
                          f"squared); lower cribo.num_clusters to at most {tokens} or raise model.img_size")


def validate_workflow_config(config: dict, schema_path: str | os.PathLike, sources: list[str]) -> None:
    """Validate the merged workflow config in place (schema defaults filled in), as Snakemake's
    ``validate`` does, but fail with one line naming the key, the file that holds it and the fix.

    ``sources`` are the config files in the order they were merged (the last wins); the error
    names the last one that sets the offending key, since that is where its value came from.
    Snakemake's own ``validate`` prints the whole schema after the error, which buries the cause.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = _fill_defaults_validator()(schema)
    for _ in range(2):  # a second pass checks defaults filled inside defaults
        errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            path = list(err.absolute_path)
            if err.validator == "additionalProperties":
                path += sorted(set(err.instance) - set(err.schema.get("properties", {})))[:1]
            raise ConfigError(_format_error(err, _file_setting(path, sources)))


def _file_setting(path: list, sources: list[str]) -> str:
    """The last of ``sources`` whose YAML sets the key at ``path`` (all of them, joined, if none does)."""
    for source in reversed(sources):
        try:
            node = yaml.safe_load(Path(source).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        else:
            return source
    return " + ".join(sources)


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (override wins; dicts merge)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides, KEY dotted (``optim.lr=1e-3``), VALUE parsed as YAML."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE (e.g. optim.lr=0.001)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" as a string; a researcher typing it means a number.
            try:
                value = float(value)
            except ValueError:
                pass
        node = cfg
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return cfg


def validate_with_overrides(cfg: dict, overrides: list[str], source: str) -> dict:
    """:func:`validate_run_config` and :func:`check_geometry` of ``cfg`` with ``--set`` overrides,
    blaming the right one on error.

    An error that the file alone does not have comes from an override: the message then names
    that ``--set KEY=VALUE``, not the file.
    """
    def validate(tree: dict, where: str) -> dict:
        checked = validate_run_config(tree, where)
        check_geometry(checked, where)
        return checked

    try:
        return validate(apply_overrides(cfg, overrides), source)
    except ConfigError as merged:
        if not overrides:
            raise
        validate(cfg, source)  # the file's own error, if it has one, is named first
        culprits = []
        for item in overrides:
            try:
                validate(apply_overrides(cfg, [item]), source)
            except ConfigError:
                culprits.append(item)
        blamed = " ".join(f"--set {item}" for item in culprits or overrides)
        raise ConfigError(str(merged).replace(f"{source}:", f"{blamed}:", 1)) from None


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, length: int = 8) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def artefact_settings(run_cfg: dict) -> dict:
    """The part of a run config that determines its checkpoint.

    ``train.*`` never does; the baselines read only a few keys, so that tuning DINO does not give
    the random and pixel baselines new run ids (and pointless recomputation).
    """
    method = run_cfg["method"]
    if method == "random":
        return {"method": method, "seed": run_cfg["seed"], "model": run_cfg["model"]}
    if method == "pixels":
        model = run_cfg["model"]
        return {"method": method, "data": run_cfg["data"],
                "model": {"patch_size": model["patch_size"], "img_size": model["img_size"]}}
    ignored = NON_ARTEFACT_KEYS + METHOD_SECTIONS_IGNORED.get(method, ())
    settings = {k: v for k, v in run_cfg.items() if k not in ignored}
    if "optim" in settings:
        # keys added after the first runs: at their default they leave the run id unchanged
        settings["optim"] = {k: v for k, v in settings["optim"].items()
                             if k not in OPTIM_KEYS_ADDED or v != OPTIM_KEYS_ADDED[k]}
    return settings


def run_id(run_cfg: dict) -> str:
    """Short hash of every setting that changes the checkpoint."""
    return short_hash(artefact_settings(run_cfg))


def ablation_runs(workflow_cfg: dict, source: str = "config/config.yaml") -> dict[str, dict]:
    """The runs an ``ablations`` grid adds: ``{name: run override}``, one per (setting, value).

    Each changes one setting of the base run (one at a time, as the paper's ablation tables do) and is
    named ``<base>~<dotted key>=<value>``, e.g. ``cribo~cribo.cycle_check=false``.
    """
    spec = workflow_cfg.get("ablations") or {}
    if not spec.get("grid"):
        return {}
    runs = workflow_cfg.get("runs") or {}
    base = spec.get("base")
    if base not in runs:
        raise ConfigError(f"{source}: ablations.base {base!r} is not one of the runs ({', '.join(runs)})")
    added = {}
    for key, values in spec["grid"].items():
        for value in values:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            override = apply_overrides(runs[base] or {}, [f"{key}={text}"])
            added[f"{base}~{key}={text}"] = override
    return added


def resolve_runs(workflow_cfg: dict, source: str = "config/config.yaml") -> dict[str, dict]:
    """Expand the workflow config's ``runs`` into full, validated run configs.

    Returns ``{run_name: run_cfg}``; each run config is ``pretrain`` deep-merged with the run's
    overrides and with ``data`` pointing at the dataset's prepared root.
    """
    shared = workflow_cfg.get("pretrain", {})
    runs = workflow_cfg.get("runs") or {}
    if not runs:
        raise ConfigError(f"{source}: 'runs' is empty; declare at least one run, e.g. runs: {{dino: {{method: dino}}}}")
    data = {"dataset": workflow_cfg["dataset"]["name"], "root": dataset_root(workflow_cfg)}
    resolved = {}
    for name, override in {**runs, **ablation_runs(workflow_cfg, source)}.items():
        merged = deep_merge(shared, {"data": data})
        merged = deep_merge(merged, override or {})
        resolved[name] = validate_run_config(merged, f"{source} (runs.{name})")
        check_geometry(resolved[name], f"{source} (runs.{name})")
    _point_orl_runs_at_stage2(workflow_cfg, resolved, source)
    return resolved


# ORL stage 2 in the workflow (the `orl` section of the workflow config), defaults = ORL's COCO settings
ORL_STAGE2_DEFAULTS = {"stage1": "byol", "shards": 1, "k": 10, "min_size": 96, "max_aspect_ratio": 3.0,
                       "max_iou": 0.5, "top_n": 100, "pair_ratio": 0.1}


def orl_stage2_settings(workflow_cfg: dict) -> dict:
    """The workflow's stage-2 settings, defaults filled in."""
    return {**ORL_STAGE2_DEFAULTS, **(workflow_cfg.get("orl") or {})}


def orl_stage2_dir(workflow_cfg: dict, stage1_run_id: str) -> str:
    """Folder of the stage-2 artefacts: under the stage-1 run, named by the settings that change them."""
    settings = orl_stage2_settings(workflow_cfg)
    key = {k: v for k, v in settings.items() if k not in ("stage1", "shards")}  # sharding changes nothing
    return f"results/{workflow_cfg['experiment']}/{stage1_run_id}/orl/{short_hash(key, 6)}"


def _point_orl_runs_at_stage2(workflow_cfg: dict, resolved: dict, source: str) -> None:
    """ORL runs without an explicit ``orl.correspondence`` get the workflow's stage-2 output of ``orl.stage1``."""
    pending = [n for n, cfg in resolved.items() if cfg["method"] == "orl" and not cfg["orl"]["correspondence"]]
    if not pending:
        return
    stage1 = orl_stage2_settings(workflow_cfg)["stage1"]
    if stage1 not in resolved or resolved[stage1]["method"] != "byol":
        raise ConfigError(f"{source}: runs {', '.join(pending)} (method orl) need a stage-1 run: orl.stage1 is "
                          f"{stage1!r}, which is not a run with method byol; add e.g. runs: {{{stage1}: "
                          "{method: byol}} or set orl.stage1")
    path = f"{orl_stage2_dir(workflow_cfg, run_id(resolved[stage1]))}/correspondence.npz"
    for name in pending:
        resolved[name] = validate_run_config(deep_merge(resolved[name], {"orl": {"correspondence": path}}),
                                             f"{source} (runs.{name})")


def dataset_root(workflow_cfg: dict) -> str:
    """Where the DAG puts the prepared dataset.

    The generated dataset's folder carries a hash of its generator settings, so changing them
    produces a new dataset instead of reusing a stale one.
    """
    ds = workflow_cfg["dataset"]
    if ds["name"] == "toyscenes":
        from cribo.data.toyscenes import GENERATOR_VERSION  # a new generator must not reuse old images

        settings = {**ds.get("toyscenes", {}), "generator_version": GENERATOR_VERSION}
        return f"resources/toyscenes-{short_hash(settings, 6)}"
    return ds["root"]


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=cwd or Path(__file__).parent, capture_output=True, text=True)
    return sha + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    names = ["cribo", "torch", "torchvision", "timm", "numpy", "faiss-cpu", "pandas", "snakemake", "dvc"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(world_size: int = 1) -> dict:
    """What produced an artefact: code version, package versions, machine, world size."""
    return {
        "git_sha": git_sha(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world_size,
    }


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike):
    """Yield a new empty directory next to ``out`` to fill; when the block ends without an error it
    replaces ``out`` (one rename), otherwise it is removed and ``out`` is left as it was."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by an earlier process of the same pid that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_figure(fig, out: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``out`` through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")  # the suffix tells savefig the format
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def write_run_config(cfg: dict, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
