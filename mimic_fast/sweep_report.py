"""The table (markdown) and the two-panel figure of a `mimic-fast sweep` report (sweep.json's dict).

matplotlib is imported only by plot(), so `import mimic_fast.sweep` stays light.
"""
import math

from . import _env
from ._io import atomic_write_bytes

COLORS = {"labels": "#d98c3f", "mimic": "#3f7fd9"}
NAMES = {"labels": "on labels", "mimic": "by mimicry"}
_STYLES = ("-", "--", ":", "-.")


def student_name(p):
    wide = f"{p['bottleneck']}L-{p['hidden']}"
    return wide if p["conv_layers"] == 0 else f"{p['conv_layers']}conv-{wide}"


def _model_name(spec):
    kw = spec.get("kwargs", {})
    name = spec.get("name") or spec.get("class") or "model"
    if name == "cnn" and "channels" in kw:
        return "CNN " + "-".join(f"{c}c" for c in kw["channels"]) + "-" + "-".join(
            map(str, kw.get("hidden", ())))
    if name == "dnn-2k" and "hidden" in kw:
        return "DNN " + "-".join(map(str, kw["hidden"]))
    return name


def _teacher_name(t):
    spec = t.get("spec") or {}
    members = spec.get("members", [spec])
    kind = _model_name(members[0])
    return f"{t['members']} x {kind}" if t["members"] > 1 else kind


def _pct(mean, std=None):
    return f"{100 * mean:.2f} %" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f} %"


def _rate(v):
    return f"{v:,.0f}" if v is not None else "—"


def _batches(result):
    return [str(b) for b in result["config"]["throughput_batches"]]


def markdown(result):
    """The report as markdown: what was compared, then one row per grid point."""
    d, tr, t, tg = result["data"], result["transfer"], result["teacher"], result["training"]
    comp = tr["composition"]
    batches = _batches(result)
    seeds = tg["seeds"]
    lines = [
        f"# Compression curve: {d['dataset']}"
        + (f" ({100 * d['label_fraction']:.0f}% of the training split labelled)"
           if d["label_fraction"] < 1 else ""),
        "",
        f"Command: `{result['command']}`",
        "",
        f"- Teacher: {_teacher_name(t)} ({t['kind']}), {t['params']:,} parameters, test accuracy "
        f"**{_pct(t['test_accuracy'])}**; {d['n_test']} test rows.",
        f"- Transfer set: {tr['rows']:,} rows = {comp['labelled']:,} labelled + "
        f"{comp['unlabelled']:,} unlabelled + {comp['generated']:,} generated ({tr['method']}); "
        f"{tr['note']}; test rows in it: {tr['test_rows']}.",
        f"- Students: each point trained on the {d['n_labelled']:,} labelled rows (cycled to "
        f"{tr['rows']:,} per epoch) and by logit regression on the teacher's stored logits; both with "
        f"the same initial weights, {tg['optimizer']} lr {tg['lr']:g}, weight decay "
        f"{tg['weight_decay']:g}, {tg['schedule']} schedule, batch {tg['batch_size']}, "
        f"{tg['steps']} optimizer steps; seeds {', '.join(map(str, seeds))} (mean ± std); precision "
        f"{tg.get('precision', 'fp32')} (training, test accuracies and timings).",
        f"- Inference samples/s: eval mode, {result['environment']['threads']} thread(s), device "
        f"{t.get('device')}, median over a point's runs (both modes: one architecture).",
        f"- Accuracies reproduce exactly on: {_env.describe(result['environment'])}.",
        "",
        "| student | params | on labels | by mimicry | mimic − labels | train s (labels / mimic) | "
        + " | ".join(f"samples/s @{b}" for b in batches) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(batches),
        f"| teacher: {_teacher_name(t)} | {t['params']:,} | {_pct(t['test_accuracy'])} | | | | "
        + " | ".join(_rate(t["throughput"].get(b)) for b in batches) + " |",
    ]
    by = {}
    for p in result["points"]:
        by.setdefault(p["point"], {})[p["mode"]] = p
    for _, pair in by.items():
        any_p = pair.get("labels") or pair.get("mimic")
        lab, mim = pair.get("labels"), pair.get("mimic")
        acc = [_pct(q["accuracy_mean"], q["accuracy_std"]) + ("" if len(q["seeds"]) == len(seeds)
                                                              else f" (n={len(q['seeds'])})")
               if q else "—" for q in (lab, mim)]
        gain = (f"{100 * (mim['accuracy_mean'] - lab['accuracy_mean']):+.2f}" if lab and mim else "—")
        secs = " / ".join(f"{q['train_s_mean']:.1f}" if q else "—" for q in (lab, mim))
        rates = [_rate(any_p["throughput"].get(b)) for b in batches]
        lines.append(f"| {student_name(any_p)} | {any_p['params']:,} | {acc[0]} | {acc[1]} | {gain} | "
                     f"{secs} | " + " | ".join(rates) + " |")
    if result.get("missing"):
        lines += ["", f"Missing runs of the grid ({len(result['missing'])}): "
                  + ", ".join(result["missing"])]
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Write sweep.png (figure(result))."""
    fig = figure(result)  # picks the Agg backend before pyplot is first imported
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(result):
    """The figure of sweep.png: accuracy vs parameters (log) and accuracy vs inference throughput at
    the largest measured batch, one curve per mode (and per conv depth / bottleneck), each mimic
    point labelled with its width H in both panels, the teacher marked; a legend in each."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    t = result["teacher"]
    batch = _batches(result)[-1]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.6))
    groups = sorted({(p["conv_layers"], p["bottleneck"]) for p in result["points"]})
    for gi, (conv, k) in enumerate(groups):
        for mode in ("labels", "mimic"):
            ps = sorted((p for p in result["points"] if p["mode"] == mode and p["conv_layers"] == conv
                         and p["bottleneck"] == k), key=lambda p: p["params"])
            if not ps:
                continue
            arch = f"{conv} conv + {k}L-H" if conv else f"{k}L-H"
            label = f"student {arch}, {NAMES[mode]}"
            y = [100 * p["accuracy_mean"] for p in ps]
            err = [100 * p["accuracy_std"] for p in ps]
            style = dict(color=COLORS[mode], ls=_STYLES[gi % len(_STYLES)], marker="o", capsize=4,
                         label=label)
            ax0.errorbar([p["params"] for p in ps], y, yerr=err, **style)
            ax1.errorbar([p["throughput"][batch] for p in ps], y, yerr=err, **style)
        for p in result["points"]:
            if p["mode"] == "mimic" and p["conv_layers"] == conv and p["bottleneck"] == k:
                for ax, x in ((ax0, p["params"]), (ax1, p["throughput"].get(batch))):
                    if x:
                        ax.annotate(f"H={p['hidden']}", (x, 100 * p["accuracy_mean"]),
                                    textcoords="offset points", xytext=(4, -12), fontsize=8,
                                    color="#444444")
    acc = 100 * t["test_accuracy"]
    note = f"teacher ({_teacher_name(t)}): {acc:.1f} %, {t['params']:,} params"
    for ax, x in ((ax0, t["params"]), (ax1, t["throughput"].get(batch))):
        ax.axhline(acc, color="#555555", ls="--", lw=1)
        if x:
            ax.plot([x], [acc], marker="*", ms=14, color="#555555", ls="none", label=note)
    ax0.annotate(note, (t["params"], acc), textcoords="offset points", xytext=(-6, 6), ha="right",
                 fontsize=9, color="#333333")
    if t["throughput"].get(batch):
        ax1.annotate(f"teacher: {t['throughput'][batch]:,.0f} samples/s", (t["throughput"][batch], acc),
                     textcoords="offset points", xytext=(8, 6), fontsize=9, color="#333333")
    for ax in (ax0, ax1):
        ax.set_xscale("log")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.25)
    ax0.set_xlabel("parameters (log scale)")
    ax1.set_xlabel(f"inference samples/s at batch {batch} on {t.get('device')} (log scale)")
    d = result["data"]
    seeds = len(result["training"]["seeds"])
    ax0.set_title(f"{d['dataset']}: accuracy vs size ({d['n_labelled']} labelled rows, "
                  f"{result['transfer']['rows']} transfer rows, {seeds} seed{'s' * (seeds > 1)})",
                  fontsize=10)
    ax1.set_title("accuracy vs inference speed (same students)", fontsize=10)
    lows = [100 * (p["accuracy_mean"] - p["accuracy_std"]) for p in result["points"]] + [acc]
    low = max(0.0, math.floor(min(lows)) - 2)
    for ax in (ax0, ax1):
        ax.set_ylim(low, min(100.0, math.ceil(acc) + 2))
        ax.legend(loc="lower right", fontsize=8)
        if low > 0:  # a zoomed axis says so: the bars' heights are not ratios of accuracy
            ax.set_ylabel(f"test accuracy (%; axis from {low:g}, not 0)")
    fig.tight_layout()
    return fig
