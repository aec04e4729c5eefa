"""Render result documents (results.py) as markdown tables and PNG plots (matplotlib, Agg backend):
one section per file, its warnings (a stale file first), targets, and the suite's table."""
import glob
import os

from .._io import atomic_write_text
from . import results, timing

MIB = 2 ** 20


def _ms(r):
    if r.get("median_ms") is None:
        return "-"
    lo, hi = r.get("q20_ms"), r.get("q80_ms")
    if lo is None:
        return f"{r['median_ms']:.3g}"
    return f"{r['median_ms']:.3g} [{lo:.3g}–{hi:.3g}]"


def _status(r):
    if r.get("status", "ok") == "ok":
        return "ok"
    return f"{r['status']}: {(r.get('error') or '')[:90]}"


def _shape(r):
    return "-".join(f"{k}{v}" for k, v in (r.get("shape") or {}).items())


def env_lines(doc):
    env = doc.get("env") or {}
    keys = ("device", "cpu_id", "cpu_flags", "torch_cpu_capability", "isa_variables", "torch",
            "torch_cuda", "triton", "mkl", "onednn", "python", "cpu_count", "threads")
    lines = [f"- {k}: {env[k]}" for k in keys if env.get(k) not in (None, {}, [])]
    load = doc.get("load_avg") or {}
    if load.get("before"):
        lines.append(f"- load average (1/5/15 min): {load['before']} before, {load.get('after')} after")
    for when, peaks in (("before", doc.get("peaks") or {}), ("after", doc.get("peaks_after") or {})):
        for name, p in peaks.items():
            if not isinstance(p, dict):
                continue
            if p.get("tflops"):
                best = p.get("best_tflops")
                lines.append(f"- {name} peak measured {when} the run: "
                             + (f"{best:.3g} TFLOP/s best round, " if best else "")
                             + f"{p['tflops']:.3g} median ({p.get('dtype', '')} {p.get('shape', '')})")
            if p.get("gbps"):
                lines.append(f"- {name} bandwidth measured {when} the run: {p['gbps']:.0f} GB/s median")
    return lines


def ops_table(doc):
    if doc.get("suite") == "cpu":
        return []  # cpu.side_by_side
    rows = [r for r in doc["results"] if r.get("op") and r.get("kind") not in ("memory", "peak")]
    if not rows:
        return []
    bw = timing.best_peak(doc, "copy")
    eager = {(r["op"], r["pass"], _shape(r), r.get("dtype"), r.get("kind")): r.get("median_ms")
             for r in rows if r["provider"] == "eager" and r.get("status", "ok") == "ok"}
    out = ["| op | shape | dtype | pass | provider | median ms [q20–q80] | min ms | throughput | "
           "% of peak | vs eager | peak mem MiB | status |", "|" + "---|" * 12]
    for r in rows:
        thr = pct = "-"
        if r.get("median_ms") is not None:
            if r["op"] in ("bottleneck_mlp", "mimic_loss", "mm") and r.get("tflops"):
                peak = timing.best_peak(doc, "mm", r.get("dtype"))
                thr = f"{r['tflops']:.3g} TFLOP/s"
                pct = f"{100 * r['tflops'] / peak:.0f}%" if peak else "-"
            elif r.get("gbps"):
                thr = f"{r['gbps']:.3g} GB/s"
                pct = f"{100 * r['gbps'] / bw:.0f}%" if bw else "-"
        e = eager.get((r["op"], r["pass"], _shape(r), r.get("dtype"), r.get("kind")))
        vs = f"{e / r['median_ms']:.2f}x" if e and r.get("median_ms") else "-"
        mem = f"{r['peak_mem_bytes'] / MIB:.1f}" if r.get("peak_mem_bytes") is not None else "-"
        mn = f"{r['min_ms']:.3g}" if r.get("min_ms") is not None else "-"
        out.append(f"| {r['op']} | {_shape(r)} | {r.get('dtype')} | {r['pass']} | {r['provider']} | "
                   f"{_ms(r)} | {mn} | {thr} | {pct} | {vs} | {mem} | {_status(r)} |")
    return out


def memory_table(doc):
    rows = [r for r in doc["results"] if r.get("kind") == "memory" or
            (r.get("peak_mem_bytes") is not None and r.get("op"))]
    if not rows:
        return []
    out = ["| op | shape | dtype | provider | peak MiB (step, over params+inputs) | of which gradients MiB "
           "| status |", "|" + "---|" * 7]
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / MIB:.1f}" if r.get("peak_mem_bytes") is not None else "-"
        g = f"{r['grad_bytes'] / MIB:.1f}" if r.get("grad_bytes") else "-"
        out.append(f"| {r['op']} | {_shape(r)} | {r.get('dtype')} | {r['provider']} | {mem} | {g} | "
                   f"{_status(r)} |")
    return out


def student_table(doc):
    rows = [r for r in doc["results"] if r.get("suite") == "student" or r.get("metric")]
    if not rows:
        return []
    by = {}
    for r in rows:
        by.setdefault((r.get("pair"), r["model"]), {})[r.get("metric", "build")] = r
    out = ["| pair | model | role | params | MFLOP/sample (fwd) | inference samples/s | "
           "train-step samples/s | batch-1 latency ms | status |", "|" + "---|" * 9]
    for (pair, model), m in by.items():
        any_r = next(iter(m.values()))
        fl = any_r.get("flops_per_sample")

        def sps(metric):
            r = m.get(metric)
            return f"{r['samples_per_s']:.4g}" if r and r.get("samples_per_s") else "-"

        lat = m.get("latency_b1")
        bad = [f"{k}: {_status(r)}" for k, r in m.items() if r.get("status", "ok") != "ok"]
        out.append(f"| {pair} | {model} | {any_r.get('role')} | "
                   f"{any_r['params'] / 1e6:.2f}M | {fl / 1e6:.1f} | " if any_r.get("params") and fl
                   else f"| {pair} | {model} | {any_r.get('role')} | - | - | ")
        out[-1] += (f"{sps('inference')} | {sps('train_step')} | "
                    f"{_ms(lat) if lat else '-'} | {'; '.join(bad) or 'ok'} |")
    return out


def _met(x):
    state = x.get("state") or ("met" if x["pass"] else "missed")
    word = {"met": "yes", "missed": "NO", "unsettled": "unsettled (runs disagree)"}[state]
    if x.get("near") and not x.get("confirmed"):
        word += " (within 10%: unconfirmed, rerun with --confirm)"
    elif x.get("confirmed"):
        word += f" (confirmed by {len(x['runs'])} runs)"
    return word


def targets_table(doc):
    t = doc.get("targets") or []
    if not t:
        return []
    out = ["| target | measured | threshold | met | detail |", "|---|---|---|---|---|"]
    for x in t:
        if "measured" not in x:
            out.append(f"| {x['target']} | - | - | {x.get('status', '-')} | {x.get('why', '')} |")
            continue
        med = f" (median {x['measured_median']:.3g})" if x.get("measured_median") is not None else ""
        out.append(f"| {x['target']} | {x['measured']:.3g}{med} | {x['threshold']} | {_met(x)} | "
                   f"{x.get('detail', '')} |")
    return out


def stale(doc):
    """Why `doc` cannot be trusted to be what its command writes today ('' if it can)."""
    missing = results.missing_fields(doc)
    if not missing:
        return ""
    return (f"written by an older harness (schema {doc.get('schema')}; no {', '.join(missing)}): "
            f"rerun `{doc.get('command') or 'its command'}`")


def side_by_side(doc):
    """Markdown rows: per H, dtype and thread count, the best-round ms of each provider (training
    step and inference), the fused/eager ratios and the matmul rate of the same rounds."""
    by = {}
    provs = []
    for r in doc.get("results", []):
        if r.get("threads") is None or r.get("run", 1) != 1:
            continue
        key = (results.case_H(r), r["dtype"], r["threads"])
        by.setdefault(key, {})[(r["pass"], r["provider"])] = r
        if r["op"] != "mm" and r["provider"] not in provs:
            provs.append(r["provider"])
    if not by:
        return []

    def ms(r):
        return f"{r['min_ms']:.4g}" if results.timed_ok(r) else ("-" if r is None else r["status"])

    cols = [("full", p) for p in provs if p != "onnx"] + [("inference", p) for p in provs]
    head = ["H", "dtype", "threads"] + [f"{'train' if ps == 'full' else 'infer'} {p} ms" for ps, p in cols] \
        + ["train cpu/eager", "infer cpu/eager", "mm GFLOP/s", "train cpu / mm rate", "load (1 min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (H, dt, th), m in sorted(by.items()):
        def ratio(ps):
            f, e = m.get((ps, "cpu")), m.get((ps, "eager"))
            if not (results.timed_ok(f) and results.timed_ok(e)):
                return "-"
            b, med = timing.speedup(f, e)
            return f"{b:.2f}x ({med:.2f})"
        mm = m.get(("full", "torch.mm")) or m.get(("inference", "torch.mm"))
        rate = f"{mm['best_tflops'] * 1e3:.4g}" if results.timed_ok(mm) else "-"
        f, mmf = m.get(("full", "cpu")), m.get(("full", "torch.mm"))
        frac = f"{timing.rate_fraction(f, mmf)[0]:.2f}" \
            if results.timed_ok(f) and results.timed_ok(mmf) else "-"
        load = next((r["load_avg"] for r in m.values() if r.get("load_avg")), None)
        ld = "-" if not load or not load[0] else f"{load[0][0]}→{load[1][0] if load[1] else '?'}"
        lines.append("| " + " | ".join([str(H), dt, str(th)] + [ms(m.get(c)) for c in cols]
                                       + [ratio("full"), ratio("inference"), rate, frac, ld]) + " |")
    lines.append("")
    lines.append("Best-round ms; ratios from the best rounds (medians in brackets); the matmul rate is "
                 "the best round of a square torch.mm timed in the training step's rotation.")
    return lines


def markdown_for_doc(doc, brief=False, title=None):
    lines = [f"## {title or doc.get('suite')}", ""]
    warnings = ([f"stale: {stale(doc)}"] if stale(doc) else []) + list(doc.get("warnings") or [])
    for w in warnings:
        lines.append(f"**WARNING**: {w}")
    if warnings:
        lines.append("")
    if not brief:
        if doc.get("note"):
            lines += [f"> {doc['note']}", ""]
        lines += [f"Created {doc.get('created')}; reproduce with `{doc.get('command')}`.", ""]
        lines += env_lines(doc) + [""]
    for table in (targets_table(doc), side_by_side(doc), ops_table(doc), memory_table(doc),
                  student_table(doc)):
        if table:
            lines += table + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_H(docs, path, field="median_ms", op="mimic_loss", pass_="full", ylabel="ms"):
    """One line per (provider, device, dtype, B, k, threads) of `field` against H; None (and no file)
    unless some line has two or more H: a single H is a table's job, not a curve's."""
    series = {}
    for doc in docs:
        dev = (doc.get("env") or {}).get("device", "?")
        for r in doc["results"]:
            if r.get("op") != op or r.get("pass") != pass_ or r.get(field) is None:
                continue
            if (field == "median_ms") == (r.get("kind") == "memory") or r.get("run", 1) != 1:
                continue
            key = (r["provider"], dev, r.get("dtype"), r["shape"].get("B"), r["shape"].get("k"),
                   r.get("threads"))
            series.setdefault(key, {})[r["shape"]["H"]] = r[field]
    series = {k: sorted(v.items()) for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (prov, dev, dt, B, k, th), pts in sorted(series.items(), key=str):
        ys = [y / MIB if field == "peak_mem_bytes" else y for _, y in pts]
        threads = f", {th} thr" if th else ""
        ax.plot([h for h, _ in pts], ys, marker="o",
                label=f"{prov} ({dt}, B={B}, k={k}{threads}, {dev[:24]})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden width H")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{op} {pass_}: {ylabel} vs H")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_student(docs, path):
    rows = [(doc, r) for doc in docs for r in doc["results"]
            if r.get("metric") in ("inference", "train_step") and r.get("samples_per_s")]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ("inference", "train_step")):
        sel = [(d, r) for d, r in rows if r["metric"] == metric]
        labels = [f"{r['model']}\n{(d.get('env') or {}).get('device', '')[:18]}" for d, r in sel]
        colors = ["tab:red" if r.get("role") == "teacher" else "tab:blue" if r.get("role") == "student"
                  else "tab:gray" for _, r in sel]
        ax.barh(range(len(sel)), [r["samples_per_s"] for _, r in sel], color=colors)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("samples/s (red: teacher, blue: fused student, grey: unfused student)")
        ax.set_title(f"{metric} throughput, batch {sel[0][1]['batch'] if sel else ''}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = ("time_vs_H.png", "memory_vs_H.png", "student_vs_teacher.png")


def render(results_dir, out_md=None, plots=True):
    """Every *.json in results_dir -> results_dir/README.md (or out_md) and PNG plots beside it.

    Returns (markdown path, plots made, stale): stale lists the files that are not current result
    documents (each with why). A plot with nothing to show is removed rather than left behind;
    plots=False keeps the PNGs there are and links them.
    """
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"{results_dir}: no such folder of result JSON (give it with --results)")
    docs, stale_files = [], []
    for p in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            docs.append((p, results.load(p)))
        except ValueError as e:
            stale_files.append(str(e))
            continue
        why = stale(docs[-1][1])
        if why:
            stale_files.append(f"{p}: {why}")
    out_md = out_md or os.path.join(results_dir, "README.md")
    lines = ["# mimic_fast benchmark results", "",
             "Rendered by `mimic-fast bench --report` from the JSON files in this folder; every figure "
             "was measured (see each file's command), none is extrapolated. FLOPs are model FLOPs "
             "(mimic_fast.ops.flops); '% of peak' is against the best round of a matmul timed in the "
             "same run.", ""]
    made = []
    d = [doc for _, doc in docs]
    makers = {"time_vs_H.png": lambda p: plot_vs_H(d, p),
              "memory_vs_H.png": lambda p: plot_vs_H(d, p, "peak_mem_bytes", ylabel="peak MiB"),
              "student_vs_teacher.png": lambda p: plot_student(d, p)}
    for name in PLOTS:
        path = os.path.join(results_dir, name)
        if not plots:
            if os.path.exists(path):
                made.append(name)
        elif docs and makers[name](path):
            made.append(name)
        elif os.path.exists(path):
            os.remove(path)
    if made:
        lines += [f"![{m[:-4]}]({m})" for m in made] + [""]
    for p, doc in docs:
        lines.append(markdown_for_doc(doc, title=f"{os.path.basename(p)} ({doc.get('suite')})"))
    atomic_write_text(out_md, "\n".join(lines) + "\n")
    return out_md, made if plots else [], stale_files
