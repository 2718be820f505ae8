import pytest
import torch
import torch.nn.functional as F

from kdpipe import models

# The ResNet table (he2016 in kdpipe/published.yaml, the project's targets): params (M) on CIFAR-10 / CIFAR-100.
PUBLISHED_PARAMS = {
    "resnet20": (0.27, 0.28), "resnet32": (0.47, 0.47), "resnet44": (0.66, 0.67),
    "resnet56": (0.86, 0.86), "resnet110": (1.73, 1.74),
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_param_counts_match_published_table(name):
    for num_classes, expected in zip((10, 100), PUBLISHED_PARAMS[name]):
        assert models.count_params_m(models.create(name, num_classes)) == expected


def test_resnet20_exact_param_count():
    # Hand count: option-A ResNet-20 has 269,722 params (C10); option B adds two 1x1 projections
    # with BN: 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    n = sum(p.numel() for p in models.create("resnet20", 10).parameters())
    assert n == 269_722 + 2_752


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "resnet20"])
def test_feature_taps_shapes(name):
    model = models.create(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, feats = model(x, features=True)
    assert logits.shape == (2, 10)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert all((f >= 0).all() for f in feats)  # taps are after ReLU
    torch.testing.assert_close(model(x), logits)


def test_depth_and_blocks():
    m = models.create("resnet110", 100)
    assert len(m.stage1) == len(m.stage2) == len(m.stage3) == 18
    # option B: a projection shortcut exactly where the shape changes
    assert len(m.stage1[0].shortcut) == 0 and len(m.stage2[0].shortcut) == 2 and len(m.stage3[0].shortcut) == 2
    assert len(m.stage2[1].shortcut) == 0


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20.*resnet110"):
        models.create("resnet21", 10)


# RepDistiller's models/*.py built for 100 classes (the counts its code gives; CRD's table pairs them)
REFERENCE_PARAMS = {
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_1": 180_916, "wrn_16_2": 703_284,
    "wrn_40_1": 569_780, "wrn_40_2": 2_255_156, "resnet50": 23_705_252, "vgg8": 3_965_028,
    "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobilenetv2": 812_836, "shufflev1": 949_258, "shufflev2": 1_355_528,
}
# (C, H, W) of each stage tap for a 32x32 input, and the embedding's width: RepDistiller's feature list
STAGES = {
    "resnet8x4": ([(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], 256),
    "wrn_40_2": ([(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 128),
    "resnet50": ([(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)], 2048),
    "vgg13": ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512),
    "mobilenetv2": ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),
    "shufflev1": ([(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),
    "shufflev2": ([(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
}
# a few keys of each reference state dict (RepDistiller's module names), after kdpipe's renames
REFERENCE_KEYS = {
    "resnet32x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.4.bn2.running_var", "fc.bias"],
    "wrn_40_2": ["conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.num_batches_tracked",
                 "bn1.weight", "fc.weight"],
    "resnet50": ["layer1.0.shortcut.1.weight", "layer4.2.conv3.weight", "linear.weight"],
    "vgg13": ["block0.0.weight", "block0.1.running_mean", "block0.3.bias", "block4.4.weight", "classifier.weight"],
    "mobilenetv2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.running_var", "conv2.1.weight",
                    "classifier.0.weight"],
    "shufflev1": ["layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"],
    "shufflev2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight", "bn2.bias", "linear.weight"],
}


@pytest.mark.parametrize("name", REFERENCE_PARAMS)
def test_reference_param_counts_exact(name):
    assert models.count_params(models.create(name, 100)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", STAGES)
def test_features_contract(name):
    torch.manual_seed(0)
    model = models.create(name, 100).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, features=True)
    logits, stages = out  # unpacks as (logits, stages)
    assert out.logits is logits and out.stages is stages
    assert ([tuple(f.shape[1:]) for f in stages], out.embedding.shape[1]) == STAGES[name]
    head = dict(model.named_children())[next(n for n in ("fc", "linear", "classifier") if hasattr(model, n))]
    torch.testing.assert_close(head(out.embedding), logits)  # the embedding is what the classifier reads
    torch.testing.assert_close(model(x), logits)
    # `final` is the map the embedding is the global average of; models.classifier names the linear layer on it
    torch.testing.assert_close(out.final.mean((2, 3)), out.embedding)
    assert isinstance(models.classifier(model), torch.nn.Linear)
    torch.testing.assert_close(models.classifier(model)(out.embedding), logits)


@pytest.mark.parametrize("name", REFERENCE_KEYS)
def test_reference_state_dict_layout(name):
    keys = set(models.create(name, 100).state_dict())
    assert {models.from_reference_key(name, k) for k in REFERENCE_KEYS[name]} <= keys
    assert models.from_reference_key("resnet56", "layer2.0.downsample.1.weight") == "stage2.0.shortcut.1.weight"


def test_seed_resnet_checkpoints_keep_their_keys():
    # kdpipe's checkpoints (stage1..3, shortcut, fc) load unchanged; RepDistiller's names are mapped on import
    keys = list(models.create("resnet20", 10).state_dict())
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "stage2.0.shortcut.0.weight" in keys and "stage3.2.bn2.running_var" in keys
    assert not any(k.startswith("layer") or "downsample" in k for k in keys)


def test_mobilenetv1_is_mdistillers():
    # mdistiller's models/imagenet/mobilenetv1.py: 4,231,976 parameters at 1,000 classes; its forward taps
    # feat1..feat4 = model[3|5|11|13] without the last ReLU, each stage fed the ReLU of the previous tap
    m = models.create("mobilenetv1", 1000).eval()
    assert models.count_params(m) == 4_231_976
    keys = list(m.state_dict())
    assert keys[:2] == ["model.0.0.weight", "model.0.1.weight"] and "model.13.4.running_var" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = m(x, features=True)
        feat1 = m.model[3][:-1](m.model[0:3](x))
        feat2 = m.model[5][:-1](m.model[4:5](F.relu(feat1)))
        feat3 = m.model[11][:-1](m.model[6:11](F.relu(feat2)))
        feat4 = m.model[13][:-1](m.model[12:13](F.relu(feat3)))
        pooled = F.avg_pool2d(F.relu(feat4), 7).reshape(-1, 1024)  # the reference's AvgPool2d(7)
        reference = [feat1, feat2, feat3, feat4]
        assert all(torch.equal(a, b) for a, b in zip(out.preact[1:], reference))
        assert all(torch.equal(a, F.relu(b)) for a, b in zip(out.stages[1:], reference))
        torch.testing.assert_close(out.embedding, pooled)
        torch.testing.assert_close(out.logits, m.fc(pooled))
    assert [tuple(f.shape[1:]) for f in out.stages] == [(32, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14),
                                                        (1024, 7, 7)]
