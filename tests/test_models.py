"""Paper models: parameter counts from the formulas, meta-device builds, forward shapes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mimic_fast as mf
from mimic_fast.models import (CNN, DNN, PAPER_CONFIGS, ConvStudent, ShallowNet, TeacherEnsemble,
                               build_model, count_parameters)

D, C, K = 1845, 183, 250  # TIMIT: 15 frames x 123 features; 61 phones x 3 states; 250L


def _wide(H):
    return D * K + K * H + H + H * C + C


@pytest.mark.parametrize("name, expected", [
    ("snn-mimic-8k", _wide(8000)),                                                  # 3.93M
    ("snn-mimic-400k", _wide(400000)),                                              # 174.1M
    ("snn-8k", D * 8000 + 8000 + 8000 * C + C),                                     # 16.2M
    ("dnn-2k", D * 2000 + 2000 + 2 * (2000 * 2000 + 2000) + 2000 * C + C),          # 12.1M
    ("cnn", (16 * 9 + 16) + 16 * (D // 12) * 2000 + 2000 + 2 * (2000 * 2000 + 2000) + 2000 * C + C),
])
def test_paper_parameter_counts(name, expected):
    model = build_model(name, in_features=D, num_classes=C, device="meta")
    assert count_parameters(model) == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_paper_sizes_match_papers_md():
    # papers.md: "1845·250 + 250·400000 + 400000·183 ≈ 173.7M"; DNN ~12M; CNN ~13M.
    no_bias = D * K + K * 400000 + 400000 * C
    assert round(no_bias / 1e6, 1) == 173.7
    m = build_model("snn-mimic-400k", device="meta")  # TIMIT sizes are the default
    assert count_parameters(m) - 400000 - C == no_bias
    assert isinstance(m, mf.nn.WideShallowStudent) and (m.hidden, m.bottleneck) == (400000, 250)
    assert 11.5e6 < count_parameters(build_model("dnn-2k", device="meta")) < 12.5e6
    assert 12.5e6 < count_parameters(build_model("cnn", device="meta")) < 13.5e6
    assert set(PAPER_CONFIGS) >= {"snn-mimic-8k", "snn-mimic-400k", "snn-8k", "dnn-2k", "cnn",
                                  "conv-student-1", "conv-student-4"}


def test_conv_student_forward_and_fused_loss():
    x = torch.randn(3, 3, 16, 16)
    for n in range(1, 5):
        m = ConvStudent((3, 16, 16), 7, conv_layers=n, channels=4, bottleneck=8, hidden=32)
        assert m(x).shape == (3, 7) and m(x.flatten(1)).shape == (3, 7)
        assert len([l for l in m.features if isinstance(l, torch.nn.Conv2d)]) == n
    t = torch.randn(3, 7)
    torch.testing.assert_close(m.mimic_loss(x, t), mf.logit_mse_loss(m(x), t), rtol=1e-5, atol=1e-6)
    m1 = ConvStudent((2, 40), 5, conv_layers=2, channels=(3, 4), bottleneck=6, hidden=20,
                     activation="tanh")
    assert m1(torch.randn(4, 80)).shape == (4, 5) and m1.head.activation == "tanh"
    b = build_model("conv-student-3", channels=4, bottleneck=8, hidden=16, device="meta")
    assert b.conv_layers == 3 and b.head.in_features == 4 * 4 * 4 and b.head.num_classes == 10
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match="conv_layers"):
            ConvStudent((3, 16, 16), 7, conv_layers=bad)
    with pytest.raises(ValueError, match="too small"):
        ConvStudent((3, 4, 4), 7, conv_layers=4, channels=2, bottleneck=2, hidden=4)


def test_cnn_dnn_shallow_and_ensemble_forward():
    img = CNN((3, 32, 32), 10)
    assert img(torch.randn(2, 3, 32, 32)).shape == (2, 10) and img(torch.randn(2, 3072)).shape == (2, 10)
    frames = CNN((1, 1845), 183, hidden=(64,))
    assert frames(torch.randn(2, 1845)).shape == (2, 183)
    assert CNN((60,), 4, hidden=(8,), pool=3)(torch.randn(5, 60)).shape == (5, 4)
    with pytest.raises(ValueError, match="x has shape"):
        img(torch.randn(2, 3, 31, 32))
    dnn = DNN(12, 3, hidden=(8, 8))
    assert dnn(torch.randn(4, 3, 4)).shape == (4, 3)
    assert sum(isinstance(l, torch.nn.Dropout) for l in dnn.net) == 2
    snn = ShallowNet(12, 3, 20, activation="sigmoid")
    assert snn(torch.randn(4, 12)).shape == (4, 3)
    members = [DNN(12, 3, hidden=(8,), dropout=0.0) for _ in range(3)]
    ens = TeacherEnsemble(members)
    x = torch.randn(5, 12)
    torch.testing.assert_close(ens(x), sum(m(x) for m in members) / 3)
    with pytest.raises(TypeError):
        TeacherEnsemble([])
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="activation"):
        ShallowNet(4, 2, 8, activation="swish")


def test_build_model_overrides_and_dtype():
    m = build_model("snn-mimic-8k", in_features=20, num_classes=3, hidden=64, bottleneck=4,
                    dtype=torch.float64)
    assert (m.in_features, m.hidden, m.bottleneck) == (20, 64, 4) and m.U.dtype == torch.float64
    assert build_model("dnn-2k", input_shape=(1, 8, 8), num_classes=10, hidden=(16,))(
        torch.randn(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="disagrees"):
        build_model("cnn", in_features=10, input_shape=(1, 8, 8))


def test_core_import_stays_light():
    code = ("import sys, mimic_fast; assert 'mimic_fast.data' not in sys.modules; "
            "assert 'mimic_fast.models' not in sys.modules; import mimic_fast.data, mimic_fast.models; "
            "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
