import torch

from kdpipe import synthetic


def test_deterministic_from_seed():
    a = synthetic.generate(10, 64, 16, seed=3)
    b = synthetic.generate(10, 64, 16, seed=3)
    c = synthetic.generate(10, 64, 16, seed=4)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])


def test_cifar_shape_and_balanced_labels():
    (x, y), (tx, ty) = synthetic.generate(100, 300, 200, seed=0)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.uint8
    assert tx.shape == (200, 3, 32, 32) and ty.dtype == torch.int64
    assert torch.bincount(y, minlength=100).tolist() == [3] * 100
    assert set(ty.tolist()) == set(range(100))


def test_images_vary_and_are_not_constant():
    (x, _), _ = synthetic.generate(10, 50, 10, seed=0)
    xf = x.float()
    assert xf.std() > 20  # real contrast
    assert (xf[0] - xf[1]).abs().mean() > 5  # two images differ
