"""`mimic-fast demo`: the paper's effect on scikit-learn's digits, in a few minutes on 2 CPU cores.

Low-label regime: a fraction of the training split keeps its labels, the rest is unlabelled. A deep
teacher learns from the labelled rows; a wide shallow student (linear bottleneck) is trained twice,
on the labels only and by mimicry of the teacher's stored logits over a transfer set (labelled +
unlabelled + MUNGE-generated rows). --precision bf16 trains, evaluates and times every model under
bfloat16 autocast over float32 weights (train.autocast); the teacher's logits are computed in
float32 either way (their stored precision is the store's dtype, as with collect-logits). Limits:
digits is tiny (8x8), so absolute numbers are a sketch of the effect, not the papers' TIMIT/CIFAR
results; timings are of this machine's CPU (bf16 is fast only where the CPU has bf16 matrix units:
the demo's output says which path the fused op took).
"""
import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from . import _env, dispatch
from . import pipeline as P
from . import train as T
from ._io import atomic_write_bytes, atomic_write_text
from .models import count_parameters
from .nn import WideShallowStudent
from .ops import cpu as cpu_ops

__all__ = ["DemoConfig", "run_demo", "add_arguments", "main"]


@dataclass
class DemoConfig:
    seeds: tuple = (0, 1, 2)
    label_fraction: float = 0.15
    # teacher: an ensemble of small conv nets (conv-pool x 2, one fc layer, dropout), each trained on
    # the labelled rows only; its logits are averaged
    teacher_members: int = 3
    teacher_channels: tuple = (32, 64)
    teacher_hidden: tuple = (256,)
    teacher_dropout: float = 0.3
    teacher_epochs: int = 40
    teacher_batch: int = 32
    teacher_lr: float = 0.05
    # student: WideShallowStudent 64 -> k -> H -> 10, same architecture for both training modes
    student_hidden: int = 2048
    student_bottleneck: int = 32
    label_epochs: int = 60
    label_batch: int = 32
    label_lr: float = 0.05
    mimic_epochs: int = 20
    mimic_batch: int = 128
    # SGD on logit regression needs a far smaller step than on cross-entropy: the squared error is
    # unbounded and the gradient of W sums over the whole width H (0.05 diverges here)
    mimic_lr: float = 0.01
    n_generated: int = 4000  # MUNGE rows added to the transfer set
    weight_decay: float = 1e-4
    throughput_batch: int = 256
    # torch threads for the run (restored afterwards; 0 leaves torch's choice). One, because these
    # models are tiny: on a busy 2-core machine two OpenMP threads made a small CNN step ~70x slower
    # (480 ms vs 7 ms) while waiting for each other
    threads: int = 1
    # train.PRECISIONS: fp32, or bf16 autocast over float32 weights for every training, evaluation
    # and throughput measurement
    precision: str = "fp32"
    quick: bool = False

    @classmethod
    def quick_preset(cls):
        return cls(seeds=(0,), teacher_members=1, teacher_channels=(8, 16), teacher_hidden=(64,),
                   teacher_epochs=6, student_hidden=256, student_bottleneck=16, label_epochs=10,
                   mimic_epochs=3, mimic_lr=0.05, n_generated=300, throughput_batch=64, quick=True)


def _student(cfg, in_features, num_classes):
    return WideShallowStudent(in_features, num_classes, hidden=cfg.student_hidden,
                              bottleneck=cfg.student_bottleneck)


def _curve(history):
    return [h.get("test_accuracy") for h in history]


def _run_seed(cfg, seed, workdir, progress, log):
    data = P.load_data("digits", split_seed=seed, label_fraction=cfg.label_fraction)
    splits = data.splits
    D, C = splits.in_features, splits.num_classes
    common = dict(optimizer="sgd", schedule="cosine", weight_decay=cfg.weight_decay, progress=progress,
                  precision=cfg.precision)
    out = {"seed": seed, "n_labelled": len(data.labelled), "n_unlabelled": len(data.unlabelled),
           "n_test": len(splits.test)}

    # 1. teacher: each member on the labelled rows (labels only), logits averaged
    t_seed = t0 = time.perf_counter()
    teachers = P.train_teachers(
        data, cfg.teacher_members, epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch,
        lr=cfg.teacher_lr, weight_decay=cfg.weight_decay, channels=cfg.teacher_channels,
        hidden=cfg.teacher_hidden, dnn_hidden=(), dropout=cfg.teacher_dropout,  # digits: CNNs
        progress=progress, precision=cfg.precision)
    teacher = teachers.teacher
    prec = dict(precision=cfg.precision)
    out["teacher"] = {"accuracy": T.evaluate(teacher, splits.test, **prec),
                      "member_accuracy": [T.evaluate(m, splits.test, **prec) for m in teachers.members],
                      "params": count_parameters(teacher), "train_s": time.perf_counter() - t0}

    # 2. the student on the labelled rows only
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    res = P.train_on_labels(data, _student(cfg, D, C), test=True, epochs=cfg.label_epochs,
                            batch_size=cfg.label_batch, lr=cfg.label_lr, seed=seed, **common)
    label_student = res.model
    out["student_labels"] = {"accuracy": res.final["test_accuracy"], "curve": _curve(res.history),
                             "params": count_parameters(label_student),
                             "train_s": time.perf_counter() - t0}

    # 3. the same student by mimicry: logit regression on the teacher's stored logits
    t0 = time.perf_counter()
    folder = os.path.join(workdir, f"seed{seed}")
    transfer = P.transfer_set(os.path.join(folder, P.TRANSFER_FILE), data, cfg.n_generated, "munge",
                              seed=seed)
    logits = P.collect(teacher, transfer, folder, dtype=torch.float32)
    collect_s = time.perf_counter() - t0
    torch.manual_seed(seed)  # same initial weights as the labels-only student
    res = P.distill_student(data, _student(cfg, D, C), None, logits, loss="mse",
                            epochs=cfg.mimic_epochs, batch_size=cfg.mimic_batch, lr=cfg.mimic_lr,
                            seed=seed, **common)
    mimic_student = res.model
    out["student_mimic"] = {"accuracy": res.final["test_accuracy"], "curve": _curve(res.history),
                            "params": count_parameters(mimic_student), "collect_s": collect_s,
                            "train_s": time.perf_counter() - t0,
                            "transfer_rows": logits.transfer.counts(),
                            "final_soft_loss": res.final["soft_loss"]}
    example = splits.test.tensors[0][0]
    out["throughput"] = {
        "teacher": T.throughput(teacher, example, cfg.throughput_batch, min_time=0.3, **prec),
        "student": T.throughput(mimic_student, example, cfg.throughput_batch, min_time=0.3, **prec)}
    out["run_s"] = time.perf_counter() - t_seed
    log(f"seed {seed}: teacher {out['teacher']['accuracy']:.4f}  student(labels) "
        f"{out['student_labels']['accuracy']:.4f}  student(mimic) {out['student_mimic']['accuracy']:.4f}")
    return out


def _mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def _summary(runs):
    rows = {}
    for key in ("teacher", "student_labels", "student_mimic"):
        mean, std = _mean_std([r[key]["accuracy"] for r in runs])
        rows[key] = {"accuracy_mean": mean, "accuracy_std": std, "params": runs[0][key]["params"]}
    for key, name in (("teacher", "teacher"), ("student_mimic", "student")):
        rows[key]["samples_per_s"] = _mean_std([r["throughput"][name] for r in runs])[0]
    rows["student_labels"]["samples_per_s"] = rows["student_mimic"]["samples_per_s"]  # same net
    return rows


def format_table(result):
    cfg, rows = result["config"], result["summary"]
    n = len(cfg["seeds"])
    names = {
        "teacher": (f"teacher: {cfg['teacher_members']} x CNN "
                    f"{'c-'.join(map(str, cfg['teacher_channels']))}c-"
                    f"{'-'.join(map(str, cfg['teacher_hidden']))} (labels)"),
        "student_labels": (f"student {cfg['student_bottleneck']}L-{cfg['student_hidden']} "
                           "on labels only"),
        "student_mimic": f"student {cfg['student_bottleneck']}L-{cfg['student_hidden']} by mimicry",
    }
    acc_head = f"test accuracy ({n} seed{'s' if n > 1 else ''})"
    lines = [f"{'model':<44} {'params':>9}  {acc_head:>27}  {'inference samples/s':>20}"]
    for key, name in names.items():
        r = rows[key]
        acc = f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} %"
        lines.append(f"{name:<44} {r['params']:>9,}  {acc:>27}  {r['samples_per_s']:>20,.0f}")
    env = result.get("environment", {})
    lines.append(f"(inference: eval mode, batch {cfg['throughput_batch']}, {env.get('threads')} CPU "
                 f"thread(s), fused backend {result.get('backend')!r}; accuracy: mean +- std over seeds)")
    lines.append(_precision_line(result))
    if "torch_cpu_capability" in env:  # older demo.json files lack the machine record
        lines.append(f"(accuracies reproduce exactly on: {_env.describe(env)})")
    return "\n".join(lines)


def _precision_line(result):
    p, fused = result["precision"], result["precision"]["fused_op"]
    if p["precision"] == "fp32":
        return "(precision fp32: training, test accuracy and inference in float32)"
    return (f"(precision {p['precision']}: training, test accuracy and inference under "
            f"{fused['dtype']} autocast over float32 weights; the fused op on backend "
            f"{fused['backend']!r}: {fused['path']})")


def _plot(result, path):
    fig = figure(result)  # picks the Agg backend before pyplot is first imported
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(result):
    """demo.png: the three models' mean accuracy (bars on an axis that starts at a labelled
    baseline, not 0: the differences are a few points) and the students' training curves."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    rows, runs = result["summary"], result["runs"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = ["teacher", "student_labels", "student_mimic"]
    labels = ["deep teacher", "student\n(labels only)", "student\n(mimic)"]
    means = [100 * rows[k]["accuracy_mean"] for k in keys]
    stds = [100 * rows[k]["accuracy_std"] for k in keys]
    bars = ax0.bar(labels, means, yerr=stds, capsize=6, color=["#777777", "#d98c3f", "#3f7fd9"])
    for b, m, s in zip(bars, means, stds):
        ax0.text(b.get_x() + b.get_width() / 2, m + s + 0.2, f"{m:.1f}", ha="center", va="bottom")
    low = min(m - s for m, s in zip(means, stds))
    base = max(0.0, math.floor(low - 5))
    ax0.set_ylim(base, 100.5)
    ax0.set_ylabel("test accuracy (%)" if base == 0 else
                   f"test accuracy (%; axis from {base:g}, not 0)")
    ax0.set_title(f"digits, {100 * result['config']['label_fraction']:.0f}% of train labelled "
                  f"({len(runs)} seed{'s' if len(runs) > 1 else ''}, {result['precision']['precision']})")
    cfg = result["config"]
    for key, name, color in (("student_labels", "student, labels only", "#d98c3f"),
                             ("student_mimic", "student, mimic", "#3f7fd9")):
        for i, r in enumerate(runs):
            # x in optimizer steps: an epoch over the transfer set is ~25x one over the labelled rows
            rows, batch = ((r["n_labelled"], cfg["label_batch"]) if key == "student_labels" else
                           (sum(r[key]["transfer_rows"].values()), cfg["mimic_batch"]))
            per_epoch = math.ceil(rows / batch)
            curve = [100 * a for a in r[key]["curve"]]
            ax1.plot([per_epoch * (e + 1) for e in range(len(curve))], curve, color=color, alpha=0.8,
                     label=name if i == 0 else None)
    ax1.axhline(means[0], color="#777777", ls="--", label="teacher (mean)")
    ax1.set_xlabel("optimizer steps (points at epoch ends)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("student training curves (one line per seed)")
    ax1.legend(loc="lower right")
    fig.tight_layout()
    return fig


def run_demo(out="runs/demo", config=None, progress=False, log=print):
    """Run the demo; write out/demo.json and out/demo.png; return the result dict."""
    cfg = config or DemoConfig()
    if not 0 < cfg.label_fraction < 1:
        raise ValueError(f"label_fraction must be in (0, 1), got {cfg.label_fraction}")
    if not cfg.seeds:
        raise ValueError("seeds must not be empty")
    T.check_precision(cfg.precision)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, progress, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg, out, progress, log):
    t_start = time.perf_counter()
    log(f"mimic-fast demo: digits, {100 * cfg.label_fraction:.0f}% of the training split labelled, "
        f"seeds {list(cfg.seeds)}, precision {cfg.precision}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU thread(s)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="mimic-demo-") as workdir:
        for seed in cfg.seeds:
            runs.append(_run_seed(cfg, seed, workdir, progress, log))
    result = {
        "config": asdict(cfg), "runs": runs, "summary": _summary(runs),
        "runtime_s": time.perf_counter() - t_start,
        "run_s_mean": _mean_std([r["run_s"] for r in runs])[0],  # one seed, every stage
        "environment": _env.record(),  # the accuracies reproduce where its REPRODUCE fields match
        "backend": _backend_used(cfg),
        "precision": _precision(cfg),
    }
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "demo.json"), json.dumps(result, indent=2, default=_jsonable))
    _plot(result, os.path.join(out, "demo.png"))
    log("")
    log(format_table(result))
    s = result["summary"]
    gain = 100 * (s["student_mimic"]["accuracy_mean"] - s["student_labels"]["accuracy_mean"])
    speed = s["student_mimic"]["samples_per_s"] / s["teacher"]["samples_per_s"]
    log(f"\nmimic student vs the same student on labels only: {gain:+.2f} points; "
        f"student/teacher inference throughput x{speed:.1f}; total {result['runtime_s']:.0f} s "
        f"({result['run_s_mean']:.0f} s per seed, {cfg.precision})")
    log(f"wrote {os.path.join(out, 'demo.json')} and {os.path.join(out, 'demo.png')}")
    return result


def _operand_dtype(cfg):
    # the fused op's operands: the autocast dtype under bf16 (functional.py casts them)
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _backend_used(cfg):
    p = dispatch.Problem("mimic", torch.device("cpu"), _operand_dtype(cfg), cfg.mimic_batch, 64,
                         cfg.student_bottleneck, cfg.student_hidden, 10, "relu", torch.float32)
    try:
        return dispatch.select("auto", p)
    except ValueError as e:
        return f"none ({e})"


def _precision(cfg):
    """What --precision meant in this run, and how the fused op computed in it here."""
    dtype, backend = _operand_dtype(cfg), _backend_used(cfg)
    if backend == "cpu":  # the cpu backend's path follows the CPU's features (mf.info())
        path = cpu_ops.compute_path(dtype)[1]
    else:
        path = f"the {backend} backend's {str(dtype).replace('torch.', '')} kernels"
    return {"precision": cfg.precision,
            "training": ("forward and loss under bfloat16 autocast, float32 weights, gradients and "
                         "optimizer state" if cfg.precision == "bf16" else "float32"),
            "evaluation": ("test accuracy and inference throughput under bfloat16 autocast"
                           if cfg.precision == "bf16" else "float32"),
            "logits": "the teacher's logits computed and stored in float32",
            "fused_op": {"backend": backend, "dtype": str(dtype).replace("torch.", ""),
                         "path": path}}


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def add_arguments(parser):
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, tiny models and epochs (a smoke test, seconds)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--label-fraction", type=float, default=None,
                        help="fraction of the training split that keeps its labels (default 0.15)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1: the demo's models are tiny; 0: torch's "
                             "own choice)")
    parser.add_argument("--precision", choices=T.PRECISIONS, default=None,
                        help="bf16: train, evaluate and time every model under bfloat16 autocast "
                             "over float32 weights (fast only on CPUs with bf16 matrix units: AMX, "
                             "AVX512-BF16; `mimic-fast info` says which path the fused op takes); "
                             "default fp32")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (as in every command)")
    # the old spelling asks for what is now the default: still accepted, no longer listed
    parser.add_argument("--progress", dest="progress", action="store_true", help=argparse.SUPPRESS)
    return parser


def config_from_args(args):
    cfg = DemoConfig.quick_preset() if args.quick else DemoConfig()
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        cfg.seeds = tuple(range(args.seeds))
    if args.threads is not None:
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
        cfg.threads = args.threads
    if args.label_fraction is not None:
        cfg.label_fraction = args.label_fraction
    if args.precision is not None:
        cfg.precision = args.precision
    return cfg


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="mimic-fast demo", description=__doc__,
                                                   allow_abbrev=False))
    args = parser.parse_args(argv)
    run_demo(args.out, config_from_args(args), progress=args.progress)
    return 0
