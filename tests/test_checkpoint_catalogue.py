"""The catalogue of released checkpoints and the verified fetch, on local files."""

import hashlib
import json

import pytest
import yaml

from cribo.cli import main
from cribo.data.download import DownloadError
from cribo.models.catalogue import (CatalogueError, baseline_spec, fetch_checkpoint, load_catalogue)


def test_shipped_catalogue_names_the_table_rows_and_says_what_is_unverifiable():
    catalogue = load_catalogue("config/checkpoints.yaml")
    for name in ("cribo_vits16_coco", "cribo_vits16_in1k", "cribo_vitb16_in1k", "dino_vits16", "dino_vitb16"):
        assert catalogue[name]["direct"] and catalogue[name]["url_verified"], name
    assert {catalogue[n]["pretrain"] for n in ("cribo_vits16_coco", "cribo_vits16_in1k")} == {"coco", "imagenet"}
    # a direct download always has a URL; an unverifiable entry never claims one
    for name, entry in catalogue.items():
        assert entry["source"]
        if not entry["url_verified"]:
            assert not entry["direct"], name


def _catalogue(tmp_path, payload: bytes, **extra):
    source = tmp_path / "release.pth"
    source.write_bytes(payload)
    entry = {"method": "dino", "arch": "vit_tiny", "patch_size": 16, "pretrain": "imagenet", "epochs": None,
             "url": source.as_uri(), "filename": "weights.pth", "direct": True, "url_verified": True,
             "checksum": None, "source": "test", **extra}
    path = tmp_path / "checkpoints.yaml"
    path.write_text(yaml.safe_dump({"checkpoints": {"tiny": entry}}))
    return load_catalogue(path), path


def test_fetch_verifies_the_published_md5_prefix(tmp_path):
    payload = b"released weights" * 100
    good = hashlib.md5(payload).hexdigest()[:6]
    catalogue, _ = _catalogue(tmp_path, payload, md5_prefix=good)
    path = fetch_checkpoint(catalogue, "tiny", tmp_path / "downloads", progress=False)
    assert path == tmp_path / "downloads" / "tiny" / "weights.pth" and path.read_bytes() == payload
    bad = "0" * 6 if good != "0" * 6 else "1" * 6
    catalogue, _ = _catalogue(tmp_path, payload, md5_prefix=bad)
    with pytest.raises(DownloadError, match=f"does not start with the published {bad}"):
        fetch_checkpoint(catalogue, "tiny", tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / "tiny" / "weights.pth").exists()


def test_fetch_resumes_a_partial_download_and_checks_the_sha256(tmp_path):
    payload = bytes(range(256)) * 64
    catalogue, _ = _catalogue(tmp_path, payload, checksum="sha256:" + hashlib.sha256(payload).hexdigest())
    part = tmp_path / "downloads" / "tiny" / "weights.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[:1000])  # an interrupted earlier attempt
    path = fetch_checkpoint(catalogue, "tiny", tmp_path / "downloads", progress=False)
    assert path.read_bytes() == payload and not part.exists()


def test_entries_without_a_direct_download_say_where_the_weights_are(tmp_path):
    catalogue, _ = _catalogue(tmp_path, b"x", direct=False, url="https://example.org/share?dl=0")
    with pytest.raises(CatalogueError, match=r"published at https://example.org/share\?dl=0.*baselines: \{tiny: "
                                             r"\{weights: PATH, method: dino, pretrain: imagenet\}\}"):
        fetch_checkpoint(catalogue, "tiny", tmp_path / "d")
    with pytest.raises(CatalogueError, match="no checkpoint named 'nope'"):
        fetch_checkpoint(catalogue, "nope", tmp_path / "d")
    assert baseline_spec(catalogue, "tiny", "dl") == {"weights": "dl/tiny/weights.pth", "method": "dino",
                                                      "pretrain": "imagenet", "timm_model": None, "catalogue": "tiny"}


def test_malformed_catalogue_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"checkpoints": {"x": {"method": "dino", "colour": "red"}}}))
    with pytest.raises(CatalogueError, match=r"checkpoints.x: lacks arch, .*; unknown key\(s\) colour"):
        load_catalogue(path)


def test_import_baseline_from_the_catalogue(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    _, catalogue_path = _catalogue(tmp_path, weights.read_bytes(), timm_model="vit_tiny_patch16_224",
                                   filename="weights.safetensors")
    out = tmp_path / "run"
    assert main(["import-baseline", "--from-catalogue", "tiny", "--catalogue", str(catalogue_path),
                 "--downloads", str(tmp_path / "dl"), "--output-dir", str(out), "--summary",
                 str(out / "summary.json")]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "dino"
    assert (tmp_path / "dl" / "tiny" / "weights.safetensors").read_bytes() == weights.read_bytes()
    assert main(["fetch-checkpoint", "hummingbird_vitb16"]) != 0  # no public release: a clear error
