import pytest
import yaml

from cribo.config import (ConfigError, apply_overrides, deep_merge, load_yaml, resolve_runs, run_id,
                          validate_run_config)


def test_defaults_are_filled_and_nested_sections_completed():
    cfg = validate_run_config({"method": "dino"})
    assert cfg["optim"]["epochs"] == 100
    assert cfg["model"]["arch"] == "vit_small"
    assert cfg["dino"]["global_crops_scale"] == [0.25, 1.0]
    # the input is not modified in place
    raw = {"model": {"arch": "vit_tiny"}}
    validate_run_config(raw)
    assert raw == {"model": {"arch": "vit_tiny"}}


def test_typo_is_an_error_naming_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        validate_run_config({"optim": {"lrr": 0.1}}, "my.yaml")
    msg = str(err.value)
    assert "my.yaml" in msg and "'lrr'" in msg and "optim" in msg and "lr" in msg


def test_bad_value_is_an_error_naming_the_path():
    with pytest.raises(ConfigError, match="optim.epochs"):
        validate_run_config({"optim": {"epochs": 0}})
    with pytest.raises(ConfigError, match="method"):
        validate_run_config({"method": "simclr"})  # not a method of this project


def test_overrides_parse_yaml_values_and_create_sections():
    cfg = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=1e-3", "model.depth=4", "dino.norm_last_layer=false"])
    assert cfg["optim"]["lr"] == pytest.approx(1e-3)
    assert cfg["model"]["depth"] == 4
    assert cfg["dino"]["norm_last_layer"] is False
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_deep_merge_overrides_leaves_and_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 3}


def test_run_id_ignores_train_section_but_not_optim():
    base = validate_run_config({"method": "dino"})
    same = validate_run_config({"method": "dino", "train": {"num_workers": 7, "device": "cpu"}})
    other = validate_run_config({"method": "dino", "optim": {"lr": 0.1}})
    assert run_id(base) == run_id(same)
    assert run_id(base) != run_id(other)
    assert len(run_id(base)) == 8


def test_baseline_run_ids_do_not_depend_on_dino_settings():
    a = validate_run_config({"method": "random", "optim": {"lr": 0.1}})
    b = validate_run_config({"method": "random", "optim": {"lr": 0.2}})
    c = validate_run_config({"method": "random", "seed": 1})
    assert run_id(a) == run_id(b) != run_id(c)


def test_embedded_default_resolves(tmp_path):
    cfg = load_yaml("config/config.yaml")
    runs = resolve_runs(cfg)
    assert set(runs) == {"random", "pixels", "supervised", "dino", "cribo", "cribo~cribo.cycle_check=false",
                         "byol", "orl"}
    assert runs["dino"]["data"]["root"].startswith("resources/toyscenes-")
    assert len({run_id(r) for r in runs.values()}) == 8
    # ORL's stage 3 reads the correspondence file that stage 2 writes from the byol run's checkpoint
    assert runs["orl"]["orl"]["correspondence"].endswith("correspondence.npz")
    assert run_id(runs["byol"]) in runs["orl"]["orl"]["correspondence"]


def test_unreadable_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listy)


@pytest.mark.parametrize("name, arch, clusters, pos_alpha, total_batch, epochs", [
    ("cribo_vits16_coco", "vit_small", 64, 2.0, 256, 300),
    ("cribo_vits16_in1k", "vit_small", 32, 1.0, 1024, 800),
    ("cribo_vitb16_in1k", "vit_base", 32, 1.0, 1024, 400),
])
def test_released_run_configs_validate_with_their_published_settings(name, arch, clusters, pos_alpha, total_batch, epochs):
    cfg = validate_run_config(load_yaml(f"config/runs/{name}.yaml"), name)
    assert cfg["method"] == "cribo" and cfg["model"]["arch"] == arch and cfg["model"]["patch_size"] == 16
    assert cfg["cribo"]["num_clusters"] == clusters and cfg["cribo"]["pos_alpha"] == pos_alpha
    assert cfg["cribo"]["queue_size"] == 25000 and cfg["dino"]["out_dim"] == cfg["cribo"]["object_out_dim"] == 65536
    gpus = 16 if arch == "vit_base" else 8
    assert cfg["optim"]["batch_size"] * gpus == total_batch and cfg["optim"]["epochs"] == epochs
    assert cfg["released"]["world_size"] == gpus and cfg["released"]["batch_size"] == cfg["optim"]["batch_size"]
    # the released launch is a note, not a setting: the run id ignores it
    assert run_id(cfg) == run_id({k: v for k, v in cfg.items() if k != "released"})


def test_released_batch_note_says_what_a_different_launch_changes():
    from cribo.config import released_batch_note

    cfg = validate_run_config(load_yaml("config/runs/cribo_vits16_coco.yaml"), "coco")  # 8 x 32 = 256
    assert released_batch_note(cfg, 8) is None
    note = released_batch_note(cfg, 2)  # per-process batch kept: 2 x 32 = 64
    assert note["this_run"] == {"world_size": 2, "batch_size": 32, "total_batch": 64,
                                "batch_size_set_explicitly": False}
    assert note["released"]["total_batch"] == 256 and len(note["differs"]) == 1
    assert note["differs"][0].startswith("total batch")
    # 2 x 128 = 256: same total, another per-process batch (per-rank retrieval differs)
    explicit = released_batch_note(apply_overrides(cfg, ["optim.batch_size=128"]), 2, overridden=True)
    assert explicit["this_run"]["total_batch"] == 256 and explicit["this_run"]["batch_size_set_explicitly"]
    assert [d.split(" (")[0] for d in explicit["differs"]] == ["per-process batch"]
    assert released_batch_note(validate_run_config({"method": "cribo"}), 3) is None  # not a released config


def test_cribo_with_local_crops_is_an_error():
    with pytest.raises(ConfigError, match=r"method cribo has no local crops, but dino.local_crops_number is 2"):
        validate_run_config({"method": "cribo", "dino": {"local_crops_number": 2}}, "x.yaml")
    assert validate_run_config({"method": "dino", "dino": {"local_crops_number": 2}})["dino"]["local_crops_number"] == 2


@pytest.mark.parametrize("name, method, images_dataset", [
    ("byol_r50_coco", "byol", "coco"), ("orl_r50_coco", "orl", "coco"),
    ("byol_r50_cocoplus", "byol", "cocoplus"), ("orl_r50_cocoplus", "orl", "cocoplus"),
])
def test_released_orl_configs_have_the_official_recipe(name, method, images_dataset):
    cfg = validate_run_config(load_yaml(f"config/runs/{name}.yaml"), name)
    assert cfg["method"] == method and cfg["model"]["arch"] == "resnet50" and cfg["data"]["dataset"] == images_dataset
    optim, byol = cfg["optim"], cfg["byol"]
    # SGD lr 0.4 at a total batch of 512 (8 GPUs x 64): our peak is lr * total / 256
    assert optim["optimizer"] == "sgd" and optim["sgd_momentum"] == 0.9
    assert optim["batch_size"] * 8 == 512 and optim["lr"] * 512 / 256 == pytest.approx(0.4)
    assert optim["weight_decay"] == optim["weight_decay_end"] == 1e-4 and optim["decay_all_parameters"]
    assert (optim["warmup_epochs"], optim["epochs"], optim["min_lr"], optim["precision"]) == (4, 800, 0.0, "fp16")
    assert (byol["projector_hidden_dim"], byol["out_dim"], byol["predictor_hidden_dim"]) == (4096, 256, 4096)
    assert byol["momentum_target"] == 0.99
    if method == "orl":
        assert cfg["orl"]["roi_size"] == 96 and cfg["orl"]["loss_weights"] == {"global": 1.0, "intra": 1.0, "inter": 1.0}


def test_vit_orl_configs_follow_cribos_coco_recipe():
    cribo = validate_run_config(load_yaml("config/runs/cribo_vits16_coco.yaml"), "cribo")
    for name in ("byol_vits16_coco", "orl_vits16_coco"):
        cfg = validate_run_config(load_yaml(f"config/runs/{name}.yaml"), name)
        assert "DEVIATION" in open(f"config/runs/{name}.yaml").read()
        assert cfg["model"] == cribo["model"] and cfg["data"] == cribo["data"]
        assert {k: cfg["optim"][k] for k in ("epochs", "batch_size", "lr", "weight_decay", "weight_decay_end")} == \
            {k: cribo["optim"][k] for k in ("epochs", "batch_size", "lr", "weight_decay", "weight_decay_end")}
        assert cfg["byol"]["momentum_target"] == cribo["dino"]["momentum_teacher"]


def test_orl_runs_point_at_the_stage2_output_of_their_stage1_run():
    from cribo.config import ConfigError, resolve_runs, run_id

    cfg = {"experiment": "x", "dataset": {"name": "toyscenes", "root": "resources/toyscenes"}, "pretrain": {},
           "runs": {"b": {"method": "byol"}, "o": {"method": "orl"}}, "orl": {"stage1": "b", "k": 3}}
    runs = resolve_runs(cfg)
    path = runs["o"]["orl"]["correspondence"]
    assert path.startswith(f"results/x/{run_id(runs['b'])}/orl/") and path.endswith("/correspondence.npz")
    other = resolve_runs({**cfg, "orl": {"stage1": "b", "k": 4}})["o"]["orl"]["correspondence"]
    assert other != path and run_id(runs["o"]) != run_id(resolve_runs({**cfg, "orl": {"stage1": "b", "k": 4}})["o"])
    sharded = resolve_runs({**cfg, "orl": {"stage1": "b", "k": 3, "shards": 8}})["o"]["orl"]["correspondence"]
    assert sharded == path  # sharding does not change the result
    with pytest.raises(ConfigError, match="orl.stage1"):
        resolve_runs({**cfg, "runs": {"o": {"method": "orl"}}})


def test_ablation_grid_expands_one_setting_at_a_time():
    from cribo.config import ConfigError, resolve_runs, run_id

    cfg = {"dataset": {"name": "toyscenes", "root": "resources/toyscenes"}, "pretrain": {"optim": {"epochs": 3}},
           "runs": {"cribo": {"method": "cribo", "cribo": {"num_clusters": 8}}, "dino": {"method": "dino"}},
           "ablations": {"base": "cribo", "grid": {"cribo.num_clusters": [4, 16], "cribo.cycle_check": [False]}}}
    runs = resolve_runs(cfg)
    assert set(runs) == {"cribo", "dino", "cribo~cribo.num_clusters=4", "cribo~cribo.num_clusters=16",
                         "cribo~cribo.cycle_check=false"}
    ablated = runs["cribo~cribo.cycle_check=false"]
    # only the ablated setting differs from the base run; the base's own override and shared settings stay
    assert ablated["cribo"]["cycle_check"] is False and ablated["cribo"]["num_clusters"] == 8
    assert ablated["optim"]["epochs"] == 3 and runs["cribo"]["cribo"]["cycle_check"] is True
    assert runs["cribo~cribo.num_clusters=16"]["cribo"]["num_clusters"] == 16
    assert len({run_id(c) for c in runs.values()}) == 5
    with pytest.raises(ConfigError, match="ablations.base 'crib'"):
        resolve_runs({**cfg, "ablations": {"base": "crib", "grid": {"cribo.num_clusters": [4]}}})
    with pytest.raises(ConfigError, match="num_cluster"):
        resolve_runs({**cfg, "ablations": {"base": "cribo", "grid": {"cribo.num_cluster": [4]}}})
