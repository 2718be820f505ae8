import pytest
import torch

from kdpipe import models

# The published table: params (M) on CIFAR-10 / CIFAR-100.
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
