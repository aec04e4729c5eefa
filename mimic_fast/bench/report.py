"""Render benchmark JSON (our schema or pytest-benchmark's --benchmark-json) as markdown and PNG plots.

`load(path)` normalises either format to our document shape, so tables, plots and the regression
compare read one kind of record. Plots need matplotlib (Agg backend; nothing is shown).
"""
import glob
import json
import os

MIB = 2 ** 20


def load(path):
    """A result document {suite, env, peaks, results, targets, ...} from either JSON format."""
    with open(path) as f:
        raw = json.load(f)
    if "schema" in raw:
        return raw
    if "benchmarks" in raw:
        return from_pytest_benchmark(raw)
    raise ValueError(f"{path}: not a mimic_fast.bench or pytest-benchmark JSON file")


def from_pytest_benchmark(raw):
    """pytest-benchmark JSON -> our document; each benchmark's extra_info holds the record fields."""
    results = []
    peaks = {}
    for b in raw["benchmarks"]:
        info = dict(b.get("extra_info") or {})
        st = b.get("stats") or {}
        rec = {"name": info.pop("name", b.get("fullname") or b["name"]), "status": "ok", "error": None,
               **info}
        if st:
            rec.update(median_ms=st["median"] * 1e3, q25_ms=st.get("q1", st["median"]) * 1e3,
                       q75_ms=st.get("q3", st["median"]) * 1e3, min_ms=st["min"] * 1e3,
                       mean_ms=st["mean"] * 1e3, rounds=st.get("rounds"))
            sec = st["median"]
            if rec.get("flops"):
                rec["tflops"] = rec["flops"] / sec / 1e12
            if rec.get("bytes"):
                rec["gbps"] = rec["bytes"] / sec / 1e9
            if rec.get("batch") and rec.get("metric"):
                rec["samples_per_s"] = rec["batch"] / sec
        if rec.get("kind") == "peak":
            peaks[rec.get("peak", "matmul")] = rec
        results.append(rec)
    env = (raw["benchmarks"][0].get("extra_info") or {}).get("env") if raw["benchmarks"] else {}
    mi = raw.get("machine_info", {})
    env = env or {"device": mi.get("cpu", {}).get("brand_raw"), "python": mi.get("python_version")}
    return {"schema": "pytest-benchmark", "suite": "pytest-benchmark", "created": raw.get("datetime"),
            "command": "pytest benchmarks/ --benchmark-json", "note": None, "env": env,
            "peaks": peaks, "results": results, "targets": []}


def _ms(r):
    if r.get("median_ms") is None:
        return "-"
    lo, hi = r.get("q20_ms", r.get("q25_ms")), r.get("q80_ms", r.get("q75_ms"))
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
    keys = ("device", "torch", "torch_cuda", "triton", "python", "cpu_count", "torch_threads")
    lines = [f"- {k}: {env[k]}" for k in keys if env.get(k) is not None]
    for name, p in (doc.get("peaks") or {}).items():
        if p.get("tflops"):
            lines.append(f"- measured {name} peak (same run): {p['tflops']:.3g} TFLOP/s "
                         f"({p.get('dtype', '')} {p.get('shape', '')})")
        if p.get("gbps"):
            lines.append(f"- measured {name} bandwidth (same run): {p['gbps']:.0f} GB/s")
    return lines


def ops_table(doc):
    rows = [r for r in doc["results"] if r.get("op") and r.get("kind") not in ("memory", "peak")]
    if not rows:
        return []
    peak = (doc.get("peaks") or {}).get("matmul", {}).get("tflops")
    bw = (doc.get("peaks") or {}).get("copy", {}).get("gbps")
    eager = {(r["op"], r["pass"], _shape(r), r.get("dtype"), r.get("kind")): r.get("median_ms")
             for r in rows if r["provider"] == "eager" and r.get("status", "ok") == "ok"}
    out = ["| op | shape | dtype | pass | provider | median ms [q20–q80] | min ms | throughput | "
           "% of peak | vs eager | peak mem MiB | status |", "|" + "---|" * 12]
    for r in rows:
        thr = pct = "-"
        if r.get("median_ms") is not None:
            if r["op"] in ("bottleneck_mlp", "mimic_loss", "mm") and r.get("tflops"):
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


def targets_table(doc):
    t = doc.get("targets") or []
    if not t:
        return []
    out = ["| target | measured | threshold | met | detail |", "|---|---|---|---|---|"]
    for x in t:
        if "measured" not in x:
            out.append(f"| {x['target']} | - | - | {x.get('status', '-')} | {x.get('why', '')} |")
            continue
        out.append(f"| {x['target']} | {x['measured']:.3g} | {x['threshold']} | "
                   f"{'yes' if x['pass'] else 'NO'} | {x.get('detail', '')} |")
    return out


def markdown_for_doc(doc, brief=False, title=None):
    lines = [f"## {title or doc.get('suite')}", ""]
    for w in doc.get("warnings") or []:
        lines.append(f"**WARNING**: {w}")
    if doc.get("warnings"):
        lines.append("")
    if not brief:
        if doc.get("note"):
            lines += [f"> {doc['note']}", ""]
        lines += [f"Created {doc.get('created')}; reproduce with `{doc.get('command')}`.", ""]
        lines += env_lines(doc) + [""]
    for table in (targets_table(doc), ops_table(doc), memory_table(doc), student_table(doc)):
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
    """One line per (provider, device, dtype) of `field` against H; None if there is nothing to plot."""
    series = {}
    for doc in docs:
        dev = (doc.get("env") or {}).get("device", "?")
        for r in doc["results"]:
            if r.get("op") != op or r.get("pass") != pass_ or r.get(field) is None:
                continue
            if (field == "median_ms") == (r.get("kind") == "memory"):
                continue
            key = (r["provider"], dev, r.get("dtype"), r["shape"].get("B"), r["shape"].get("k"))
            series.setdefault(key, []).append((r["shape"]["H"], r[field]))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (prov, dev, dt, B, k), pts in sorted(series.items()):
        pts.sort()
        ys = [y / MIB if field == "peak_mem_bytes" else y for _, y in pts]
        ax.plot([h for h, _ in pts], ys, marker="o", label=f"{prov} ({dt}, B={B}, k={k}, {dev[:24]})")
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


def render(results_dir, out_md=None, plots=True):
    """Every *.json under results_dir -> results_dir/README.md (or out_md) and PNG plots beside it."""
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    docs = []
    for p in paths:
        try:
            docs.append((p, load(p)))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"skipping {p}: {e}")
    out_md = out_md or os.path.join(results_dir, "README.md")
    lines = ["# mimic_fast benchmark results", "",
             "Rendered by `mimic-fast bench --report` from the JSON files in this folder; every figure "
             "was measured (see each file's command), none is extrapolated. FLOPs are model FLOPs "
             "(mimic_fast.ops.flops); '% of peak' is against a matmul timed in the same run.", ""]
    made = []
    if plots and docs:
        d = [doc for _, doc in docs]
        for name, fn in (("time_vs_H.png", lambda p: plot_vs_H(d, p)),
                         ("memory_vs_H.png", lambda p: plot_vs_H(d, p, "peak_mem_bytes",
                                                                 ylabel="peak MiB")),
                         ("student_vs_teacher.png", lambda p: plot_student(d, p))):
            if fn(os.path.join(results_dir, name)):
                made.append(name)
        lines += [f"![{m[:-4]}]({m})" for m in made] + [""]
    for p, doc in docs:
        lines.append(markdown_for_doc(doc, title=f"{os.path.basename(p)} ({doc.get('suite')})"))
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out_md, made
