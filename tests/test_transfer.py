"""Transfer-set generators: reproducible from the seed, right shapes, and doing what they claim."""
import numpy as np
import pytest
import torch

from mimic_fast.data.transfer import add_noise, build_transfer_set, munge, random_shift


def _rows(t):
    return {tuple(r) for r in t.reshape(len(t), -1).tolist()}


def test_munge_seeded_shapes_and_extremes():
    X = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    a, b, c = munge(X, 47, seed=1), munge(X, 47, seed=1), munge(X, 47, seed=2)
    assert a.shape == (47, 5) and torch.equal(a, b) and not torch.equal(a, c)
    assert _rows(munge(X, 30, p=0.0)) == _rows(X)  # no swaps: exactly the source rows, each once
    # p=1 with a tiny spread: every attribute is drawn at the nearest neighbour's value.
    out = munge(X, 30, p=1.0, s=1e9, seed=4)
    d = torch.cdist(X, X)
    d.fill_diagonal_(float("inf"))
    assert _rows(out.round(decimals=4)) <= _rows(X[d.argmin(1)].round(decimals=4))
    img = munge(torch.rand(6, 2, 3, 3), 4)
    assert img.shape == (4, 2, 3, 3)
    for kw, match in [({"p": 1.5}, "p must"), ({"s": 0}, "s must"), ({"n": -1}, "n must")]:
        with pytest.raises(ValueError, match=match):
            munge(X, **{"n": 3, **kw})
    with pytest.raises(ValueError, match="2 rows"):
        munge(X[:1], 3)


def test_munge_perturbs_within_neighbour_spread():
    X = torch.tensor([[0.0, 0.0], [1.0, 10.0], [5.0, 5.0], [6.0, 15.0]])
    out = munge(X, 4000, p=0.5, s=1.0, seed=0)
    frac_changed = (~torch.isin(out, X)).float().mean().item()
    assert 0.4 < frac_changed < 0.6  # each attribute swapped with probability p


def test_add_noise():
    X = torch.randn(10, 3, 4)
    a = add_noise(X, 25, std=0.5, seed=3)
    assert a.shape == (25, 3, 4) and torch.equal(a, add_noise(X, 25, std=0.5, seed=3))
    assert _rows(add_noise(X, 10, std=0.0)) == _rows(X)
    big = add_noise(torch.zeros(4, 1000), 4, std=2.0)
    assert 1.8 < big.std().item() < 2.2
    with pytest.raises(ValueError, match="std"):
        add_noise(X, 2, std=-1.0)


def test_random_shift_moves_a_pixel_by_at_most_max_shift():
    X = torch.zeros(1, 1, 9, 9)
    X[0, 0, 4, 4] = 1.0
    out = random_shift(X, 400, max_shift=2, seed=0)
    assert out.shape == (400, 1, 9, 9) and torch.equal(out, random_shift(X, 400, max_shift=2, seed=0))
    pos = out.reshape(400, -1).argmax(1)
    dy, dx = pos // 9 - 4, pos % 9 - 4
    assert out.sum().item() == 400  # nothing lost or duplicated inside the frame
    assert dy.abs().max() == 2 and dx.abs().max() == 2
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # every offset occurs
    assert torch.equal(random_shift(X, 3, max_shift=0), X.expand(3, 1, 9, 9))
    flipped = random_shift(torch.arange(4.0).view(1, 1, 1, 4).expand(1, 2, 2, 4), 200, 0, flip=True)
    firsts = flipped[:, 0, 0, 0]
    assert set(firsts.tolist()) == {0.0, 3.0}
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_shift(torch.zeros(3, 8), 2)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(X, 2, max_shift=9)


@pytest.mark.parametrize("method, shape", [("munge", (6,)), ("noise", (6,)), ("shift", (2, 5, 5))])
def test_build_transfer_set(method, shape):
    g = torch.Generator().manual_seed(0)
    Xl, Xu = torch.randn(12, *shape, generator=g), torch.randn(5, *shape, generator=g)
    ts = build_transfer_set(Xl, Xu, n_generated=9, method=method, seed=7, y_labelled=torch.arange(12))
    assert len(ts) == 26 and ts.counts() == {"labelled": 12, "unlabelled": 5, "generated": 9}
    assert torch.equal(ts.x[:12], Xl) and torch.equal(ts.x[12:17], Xu)
    assert ts.indices("generated").tolist() == list(range(17, 26))
    assert ts[3][1].item() == 3 and ts[20][1].item() == -1 and ts[20][0].shape == shape
    again = build_transfer_set(Xl, Xu, n_generated=9, method=method, seed=7)
    assert torch.equal(again.x, ts.x) and len(again[0]) == 1  # x only without labels
    assert not torch.equal(build_transfer_set(Xl, Xu, 9, method, seed=8).x, ts.x)


def test_build_transfer_set_errors():
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="X_unlabelled rows"):
        build_transfer_set(X, torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown method"):
        build_transfer_set(X, n_generated=2, method="gan")
    with pytest.raises(ValueError, match="y_labelled"):
        build_transfer_set(X, y_labelled=torch.zeros(3))
    with pytest.raises(ValueError, match="unknown source"):
        build_transfer_set(X).indices("teacher")
    with pytest.raises(ValueError, match="integer class ids.*1.7"):  # not silently truncated to 1
        build_transfer_set(X, y_labelled=torch.tensor([0.0, 1.7, 2.0, 1.0]))
    assert build_transfer_set(X, y_labelled=np.array([0.0, 1, 2, 1])).labels.tolist() == [0, 1, 2, 1]
    # numpy integers are integers (e.g. a count computed with numpy)
    assert len(build_transfer_set(X, n_generated=np.int64(3), method="noise")) == 7
    assert build_transfer_set(X, torch.randn(2, 3), 5, "noise", generate_from="all").counts()[
        "generated"] == 5
