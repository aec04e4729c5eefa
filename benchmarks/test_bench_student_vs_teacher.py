"""Student vs deep teacher (Ba & Caruana's point): inference and training-step throughput, batch-1
latency, with the student running through the fused backend (backend="auto").

Pairs: dnn-2k vs snn-mimic-8k; cnn vs a 250L student of equal parameter count; on a GPU (or with
MIMIC_BENCH_LARGE=1) an ensemble of 9 cnn vs snn-mimic-400k, which takes minutes on a laptop CPU.
"""
import os

import pytest
import torch
from bench_common import DEVICE, ON_GPU, PAPER, ROUNDS, record, sync_wrap

from mimic_fast.bench.suites import _model_flops, student_pairs
from mimic_fast.models import count_parameters

LARGE = ON_GPU or os.environ.get("MIMIC_BENCH_LARGE") == "1"
BATCH = 4096 if ON_GPU else 256
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
PAIRS = student_pairs(PAPER["D"], PAPER["C"], 9, DEVICE)[: 3 if LARGE else 2]
MODELS = [(pair, role, name, build) for pair, t, s in PAIRS
          for role, (name, build) in (("teacher", t), ("student", s))]
_cache = {}


def _model(name, build):
    if name not in _cache:
        _cache.clear()
        torch.manual_seed(0)
        _cache[name] = build().to(DEVICE, DTYPE)
    return _cache[name]


@pytest.mark.parametrize("metric", ["inference", "train_step", "latency_b1"])
@pytest.mark.parametrize("pair,role,name,build", MODELS, ids=[f"{m[2]}" for m in MODELS])
def test_student_vs_teacher(benchmark, pair, role, name, build, metric):
    model = _model(name, build)
    g = torch.Generator().manual_seed(0)
    bsz = 1 if metric == "latency_b1" else BATCH
    x = torch.randn(bsz, PAPER["D"], generator=g).to(DEVICE, DTYPE)
    t = torch.randn(bsz, PAPER["C"], generator=g).to(DEVICE, DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer():
        with torch.no_grad():
            return model(x)

    def train_step():
        opt.zero_grad(set_to_none=True)
        fused = role == "student"  # the student trains through the fused mimic_loss
        loss = model.mimic_loss(x, t) if fused else torch.nn.functional.mse_loss(model(x), t)
        loss.backward()
        opt.step()

    model.train(metric == "train_step")
    benchmark.group = f"student-vs-teacher-{metric}"
    benchmark.pedantic(sync_wrap(train_step if metric == "train_step" else infer),
                       rounds=ROUNDS * (3 if bsz == 1 else 1), warmup_rounds=1)
    record(benchmark, name=f"student/{metric}/{name}/b{bsz}/{str(DTYPE)[6:]}/{DEVICE}", pair=pair,
           model=name, role=role, metric=metric, batch=bsz, device=DEVICE, dtype=str(DTYPE)[6:],
           params=count_parameters(model), flops_per_sample=_model_flops(model, PAPER["D"]))
    model.train(False)
