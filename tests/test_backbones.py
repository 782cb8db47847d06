import pickle

import pytest
import torch

from cribo.config import validate_run_config
from cribo.models.backbones import PixelPatches, ViTPatchFeatures, backbone_from_checkpoint, build_vit
from cribo.train.checkpoint import CheckpointLoadError, load_checkpoint, save_checkpoint


def test_pixel_patches_are_centred_raw_values_in_grid_order():
    p = 2
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    mean = torch.tensor([1.0, 2.0, 3.0])
    feats = PixelPatches(mean, p)(images)
    assert feats.shape == (2, 2, 2, 3 * p * p)
    # patch (row 1, col 0) of image 1, channel 2: pixels (2,0),(2,1),(3,0),(3,1), minus mean 3
    expected = images[1, 2, 2:4, 0:2].reshape(-1) - 3.0
    got = feats[1, 1, 0].reshape(3, p * p)[2]
    assert torch.equal(got, expected)


def test_vit_patch_features_shape_any_resolution():
    cfg = validate_run_config({"model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1}})
    model = ViTPatchFeatures(build_vit(cfg["model"])).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 4, 192)
        assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 6, 6, 192)  # interpolated position embeddings


def test_checkpoint_round_trip_rebuilds_the_same_backbone(tmp_path):
    cfg = validate_run_config({"method": "random", "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1}})
    vit = build_vit(cfg["model"], drop_path_rate=0.0)
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "random", "config": cfg, "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, path)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    model = backbone_from_checkpoint(load_checkpoint(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = vit.eval().forward_features(x)[:, 1:].reshape(1, 4, 4, -1)
        assert torch.allclose(model(x), ref)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"teacher": _RunsCode()}, fh)
    with pytest.raises(CheckpointLoadError, match="refused"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointLoadError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a checkpoint we can read"):
        backbone_from_checkpoint(load_checkpoint(tmp_path / "other.pth"))


def test_cpu_attention_is_explicit_for_few_tokens_and_fused_beyond(monkeypatch):
    """The kernel follows the token count of each call; both kernels give the same tokens (float64)."""
    import copy

    from cribo.models import backbones

    torch.manual_seed(0)
    vit = build_vit({"arch": "vit_tiny", "patch_size": 16, "img_size": 64}).double().eval()
    attention = vit.blocks[0].attn
    few = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # 16 patches + [CLS] = 17 tokens
    many = torch.randn(1, 3, 144, 144, dtype=torch.float64)  # 81 + 1 = 82 > FEW_TOKENS
    with torch.no_grad():
        explicit_few = vit.forward_features(few)
        assert attention.fused_attn is False
        fused_many = vit.forward_features(many)
        assert attention.fused_attn is True
        monkeypatch.setattr(backbones, "FEW_TOKENS", 0)  # every call fused
        fused_few = vit.forward_features(few)
        assert attention.fused_attn is True
        monkeypatch.setattr(backbones, "FEW_TOKENS", 10_000)  # every call explicit
        explicit_many = vit.forward_features(many)
        assert attention.fused_attn is False
    assert torch.allclose(explicit_few, fused_few, atol=1e-10)
    assert torch.allclose(explicit_many, fused_many, atol=1e-10)
    assert pickle.loads(pickle.dumps(copy.deepcopy(vit))) is not None  # the hook is a plain function
