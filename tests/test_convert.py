"""fuse_student on real-world model shapes (torch.fx), its report, the traps it must not fall into,
state dicts both ways, unfuse, and distill on a fused model."""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import mimic_fast as mf
from mimic_fast import train as T
from mimic_fast.testing import assert_close

D, K, H, C = 10, 3, 24, 4


class Custom(nn.Module):
    """The usual user model: Linear attributes called from forward, with extras around them."""

    def __init__(self, act=None, bias1=False, bias2=True, bias3=True, dropout=0.0, functional=None):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, K, bias=bias1)
        self.fc2 = nn.Linear(K, H, bias=bias2)
        self.act = act if act is not None else nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc3 = nn.Linear(H, C, bias=bias3)
        self.functional = functional

    def forward(self, x):
        h = self.fc2(self.fc1(self.norm(x)))
        h = self.functional(h) if self.functional is not None else self.act(h)
        return self.fc3(self.drop(h)).log_softmax(-1)


def _fuse(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing-fused warnings must not appear where we fuse
        return mf.convert.fuse_student(model, report=True, **kw)


def _grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {id(p): p.grad.clone() for p in model.parameters()}


def _check_same_function(model, fused, x, before, grads_before=None):
    assert_close(fused(x), before, "fused output")
    if grads_before is not None:
        grads = _grads(fused, x)
        for pid, g in grads_before.items():
            if pid in grads:
                assert_close(grads[pid], g, "gradient of a shared Parameter")


def _students(model):
    return [m for m in model.modules() if isinstance(m, mf.nn.WideShallowStudent)]


@pytest.mark.parametrize("act, name", [(nn.ReLU(), "relu"), (nn.Sigmoid(), "sigmoid"),
                                       (nn.Tanh(), "tanh"), (nn.GELU(), "gelu")])
def test_custom_module_is_fused_in_place(act, name):
    model = Custom(act).double()
    x = torch.randn(7, D, dtype=torch.float64)
    before, grads = model(x), _grads(model, x)
    params = {id(p) for p in model.parameters()}
    fused, report = _fuse(model)
    assert fused is model and isinstance(model.fc1, mf.nn.WideShallowStudent)
    assert model.fc1.activation == name and isinstance(model.fc3, nn.Identity)
    assert {id(p) for p in model.parameters()} == params  # the same Parameter objects
    _check_same_function(model, fused, x, before, grads)
    assert len(report.fused) == 1 and report.fused[0].layers == ["fc1", "fc2", "act", "drop", "fc3"]
    assert "fc1 -> fc2 -> act -> drop -> fc3" in str(report) and "note" not in str(report)
    assert f"H={H}" in str(report)


@pytest.mark.parametrize("fn, name", [(F.relu, "relu"), (torch.tanh, "tanh"), (F.gelu, "gelu"),
                                      (torch.sigmoid, "sigmoid"), (lambda h: h.relu(), "relu")])
def test_functional_activation_gives_a_graph_module(fn, name):
    model = Custom(functional=fn).double()
    x = torch.randn(5, D, dtype=torch.float64)
    before, grads = model(x), _grads(model, x)
    fused, report = _fuse(model)
    assert isinstance(fused, torch.fx.GraphModule) and report.graph_module
    assert [s.activation for s in _students(fused)] == [name]
    _check_same_function(model, fused, x, before, grads)
    assert "GraphModule" in str(report)


def test_dropout_in_the_chain_is_fused_only_when_inactive():
    model = Custom(dropout=0.3).double()
    x = torch.randn(5, D, dtype=torch.float64)
    with pytest.warns(UserWarning, match="training mode, p=0.3"):
        fused = mf.convert.fuse_student(model)
    assert not _students(fused)  # training-mode dropout: left alone, and said why
    model.eval()
    before = model(x)
    fused, report = _fuse(model)
    assert _students(fused) and "drop was a no-op here" in str(report)
    _check_same_function(model, fused, x, before)
    zero = Custom(dropout=0.0).double()  # p=0 is an identity in training mode too
    assert _students(_fuse(zero)[0])


@pytest.mark.parametrize("act, why", [(nn.GELU(approximate="tanh"), "only the exact erf form"),
                                      (nn.SiLU(), "SiLU is not a fused activation"),
                                      (nn.LeakyReLU(), "LeakyReLU is not a fused activation")])
def test_unsupported_activations_are_reported(act, why):
    model = Custom(act).double()
    x = torch.randn(4, D, dtype=torch.float64)
    before = model(x)
    with pytest.warns(UserWarning, match=why):
        fused, report = mf.convert.fuse_student(model, report=True)
    assert not report and why in str(report) and "fc1" in str(report)
    assert isinstance(fused.fc1, nn.Linear) and not _students(fused)
    assert_close(fused(x), before, "untouched model")


def test_first_linear_bias_is_folded_exactly():
    for bias2 in (True, False):
        model = Custom(bias1=True, bias2=bias2).double()
        x = torch.randn(6, D, dtype=torch.float64)
        before = model(x)
        c, V = model.fc1.bias.detach().clone(), model.fc2.weight.detach()
        b1 = model.fc2.bias.detach().clone() if bias2 else 0
        fused, report = _fuse(model)
        assert_close(fused.fc1.b1, V @ c + b1, "b1' = b1 + V c")
        assert_close(fused(x), before, "folded output")
    assert "folded into b1" in str(report)


@pytest.mark.parametrize("bias2, bias3", [(True, False), (False, True), (False, False)])
def test_b1_or_b2_absent(bias2, bias3):
    model = Custom(bias2=bias2, bias3=bias3).double()
    x = torch.randn(4, D, dtype=torch.float64)
    before, grads = model(x), _grads(model, x)
    fused, _ = _fuse(model)
    s = fused.fc1
    assert (s.b1 is not None, s.b2 is not None) == (bias2, bias3)
    _check_same_function(model, fused, x, before, grads)


class LoRALinear(nn.Linear):
    def __init__(self, i, o, r=2, **kw):
        super().__init__(i, o, **kw)
        self.A = nn.Parameter(torch.randn(r, i) * 0.3)
        self.B = nn.Parameter(torch.randn(o, r) * 0.3)

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


class ClippedReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x).clamp(max=0.2)


def test_subclass_traps_are_left_alone_and_reported():
    lora = Custom()
    lora.fc2 = LoRALinear(K, H)
    clipped = Custom(ClippedReLU())
    for model, name in ((lora, "LoRALinear"), (clipped, "ClippedReLU")):
        model.double()
        x = torch.randn(6, D, dtype=torch.float64)
        before = model(x)
        n_params = len(list(model.parameters()))
        with pytest.warns(UserWarning, match=f"{name} subclasses"):
            fused, report = mf.convert.fuse_student(model, report=True)
        assert not _students(fused) and len(list(fused.parameters())) == n_params
        assert_close(fused(x), before, f"{name} model untouched")
        assert f"{name} subclasses" in str(report)


def test_subclass_without_its_own_forward_is_fused():
    class MyLinear(nn.Linear):
        pass

    model = Custom().double()
    model.fc3 = MyLinear(H, C).double()
    x = torch.randn(3, D, dtype=torch.float64)
    before = model(x)
    fused, _ = _fuse(model)
    assert _students(fused)
    assert_close(fused(x), before, "fused")


def test_weight_norm_is_left_alone_with_a_reason():
    model = Custom().double()
    model.fc2 = nn.utils.parametrizations.weight_norm(model.fc2)
    with pytest.warns(UserWarning, match="parametrised"):
        fused, report = mf.convert.fuse_student(model, report=True)
    assert not _students(fused) and "remove_parametrizations" in str(report)
    old = Custom().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
        old.fc3 = nn.utils.weight_norm(old.fc3)
    with pytest.warns(UserWarning, match="forward hooks"):
        mf.convert.fuse_student(old)


def test_reused_layer_and_branching_output_are_left_alone():
    class Branch(Custom):
        def forward(self, x):
            h = self.fc2(self.fc1(x))
            return self.fc3(self.act(h)) + h.sum(-1, keepdim=True)

    with pytest.warns(UserWarning, match="used 2 times"):
        fused = mf.convert.fuse_student(Branch())
    assert not _students(fused)


def test_state_dicts_both_ways():
    torch.manual_seed(3)
    x = torch.randn(5, D, dtype=torch.float64)
    for kw in ({}, {"bias1": True}, {"functional": F.gelu}, {"bias1": True, "functional": F.gelu}):
        trained = Custom(**kw).double()
        saved = trained.state_dict()
        want = trained(x)
        # a fresh model, fused, loads the checkpoint saved before fusion (keys remapped)
        fresh, _ = _fuse(Custom(**kw).double())
        fresh.load_state_dict(saved)
        assert_close(fresh(x), want, f"fused model with a pre-fusion state dict {kw}")
        # its own (fused) state dict round-trips through torch.save into another fused model
        buf = io.BytesIO()
        torch.save(fresh.state_dict(), buf)
        again, _ = _fuse(Custom(**kw).double())
        again.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        assert_close(again(x), want, "fused -> fused")
        # unfuse: plain layers, same outputs; in place it restores the original keys
        plain = mf.convert.unfuse(again)
        assert not _students(plain)
        assert_close(plain(x), want, "unfused")
        if "functional" not in kw:
            assert plain is again and isinstance(plain.fc2, nn.Linear)
        # the original keys, a folded fc1.bias as zeros (its value stays in fc2's): the original
        # model loads the unfused state dict strictly and computes the same function
        assert set(plain.state_dict()) == set(saved)
        if kw.get("bias1"):
            assert not plain.state_dict()["fc1.bias"].any()
        original = Custom(**kw).double()
        original.load_state_dict(plain.state_dict())  # strict
        assert_close(original(x), want, f"original model with the unfused state dict {kw}")


def test_sequential_keeps_its_other_keys_and_whole_model_pickles(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, K, bias=False), nn.Linear(K, H), nn.Tanh(),
                          nn.Linear(H, C), nn.BatchNorm1d(C)).double().eval()
    x = torch.randn(4, D, dtype=torch.float64)
    before = model(x)
    saved = model.state_dict()
    fused, _ = _fuse(model)
    assert isinstance(fused[1], mf.nn.WideShallowStudent) and len(fused) == 3
    assert "5.running_mean" in fused.state_dict()  # later children keep their names
    torch.save(fused, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    loaded.load_state_dict(saved)  # the remapping hook survives pickling
    assert_close(loaded(x), before, "pickled fused model")
    plain = mf.convert.unfuse(loaded)
    assert list(plain.state_dict()) == list(saved)
    assert_close(plain(x), before, "unfused")


def test_untraceable_model_is_searched_per_submodule():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(D, K, bias=False), nn.Linear(K, H), nn.ReLU(),
                                      nn.Linear(H, C))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = -x
            return self.head(x)

    model = Dynamic().double()
    x = torch.randn(3, D, dtype=torch.float64)
    before = model(x)
    fused, report = _fuse(model)
    assert fused is model and isinstance(model.head[0], mf.nn.WideShallowStudent)
    assert report.untraced and "could not trace Dynamic" in str(report)
    assert_close(model(x), before, "fused")


def test_nothing_to_fuse_warns_and_bottleneck_linear_still_fuses():
    with pytest.warns(UserWarning, match="no Linear"):
        mf.convert.fuse_student(nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C)))
    bl = nn.Sequential(mf.nn.BottleneckLinear(D, K, H), nn.ReLU(), nn.Linear(H, C))
    x = torch.randn(3, D)
    before = bl(x)
    fused, _ = _fuse(bl)
    assert isinstance(fused[0], mf.nn.WideShallowStudent)
    assert_close(fused(x), before, "bottleneck linear fused")
    assert isinstance(mf.convert.unfuse(fused)[0], mf.nn.BottleneckLinear)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mf.convert.fuse_student(lambda x: x)


def test_unfuse_a_plain_student_and_distill_a_fused_model(monkeypatch):
    s = mf.nn.WideShallowStudent(D, C, H, K, activation="sigmoid", bias=(True, False))
    x = torch.randn(4, D)
    plain = mf.convert.unfuse(s)
    assert isinstance(plain, nn.Sequential) and plain[1].weight is s.V and plain[3].bias is None
    assert_close(plain(x), s(x), "plain layers")

    model, _ = _fuse(nn.Sequential(nn.Flatten(), nn.Linear(D, K, bias=False), nn.Linear(K, H),
                                   nn.ReLU(), nn.Linear(H, C)))
    loss_fn = mf.convert.mimic_loss_of(model)
    t = torch.randn(4, C)
    assert loss_fn is not None
    assert_close(loss_fn(x, t), F.mse_loss(model(x), t), "fused loss of the whole model")
    calls = []
    real = mf.nn.WideShallowStudent.mimic_loss
    monkeypatch.setattr(mf.nn.WideShallowStudent, "mimic_loss",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    data = TensorDataset(torch.randn(32, D), torch.randn(32, C))
    res = T.distill(model, data, epochs=2, batch_size=16, lr=0.05, progress=False)
    assert len(calls) == 4 and res.history[1]["loss"] < res.history[0]["loss"]
    assert mf.convert.mimic_loss_of(nn.Sequential(nn.Linear(D, C))) is None


def test_functional_chain_in_nested_modules_round_trips():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(D, K, bias=False), nn.Linear(K, H))
            self.out = nn.Linear(H, C)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block.out(torch.tanh(self.block.inner(x)))

    model = Net().double()
    x = torch.randn(3, D, dtype=torch.float64)
    before, saved = model(x), model.state_dict()
    fused, report = _fuse(model)
    assert report.graph_module and [c.student for c in report.fused] == ["block.inner.0"]
    assert_close(fused(x), before, "fused")
    plain = mf.convert.unfuse(fused)
    assert not _students(plain) and set(plain.state_dict()) == set(saved)
    assert_close(plain(x), before, "unfused")


def test_pre_fusion_state_dict_loads_into_a_fused_model_nested_in_another():
    torch.manual_seed(5)
    trained = nn.ModuleDict({"student": Custom(bias1=True).double()})
    x = torch.randn(3, D, dtype=torch.float64)
    want = trained["student"](x)
    fresh = nn.ModuleDict({"student": _fuse(Custom(bias1=True).double())[0]})
    fresh.load_state_dict(trained.state_dict())  # keys "student.fc1.weight", ... remapped
    assert_close(fresh["student"](x), want, "nested fused model, pre-fusion keys")


@pytest.mark.slow
def test_readme_swap_example_runs(tmp_path, monkeypatch):
    """The README's fuse/unfuse/export example, as written (its strict load of the unfused keys)."""
    pytest.importorskip("onnxscript")
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                if "mf.convert.unfuse(again)" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "student.onnx").is_file() and (tmp_path / "student.pt2").is_file()


def test_pickled_graph_module_still_loads_pre_fusion_state_dicts(tmp_path):
    torch.manual_seed(5)
    x = torch.randn(4, D, dtype=torch.float64)
    trained = Custom(functional=F.gelu, bias1=True).double()
    saved, want = trained.state_dict(), trained(x)
    fused, _ = _fuse(Custom(functional=F.gelu, bias1=True).double())
    assert isinstance(fused, torch.fx.GraphModule)
    path = tmp_path / "fused.pt"
    for round_trip in ("saved once", "saved again after reloading"):
        torch.save(fused, path)
        fused = torch.load(path, weights_only=False)
        fused.load_state_dict(saved)  # pre-fusion keys, folded fc1.bias: remapped on load
        assert_close(fused(x), want, f"reloaded GraphModule, {round_trip}")
        fused.load_state_dict(fused.state_dict())  # and its own fused keys
    plain = mf.convert.unfuse(fused)
    torch.save(plain, path)
    plain = torch.load(path, weights_only=False)
    plain.load_state_dict(saved)  # the original keys, no remapping left
    assert_close(plain(x), want, "unfused, pickled")
