"""Rerun the demo and/or the default sweep and compare them with the committed JSON.

    python scripts/check_reproduction.py            # both (~3 minutes on 2 cores)
    python scripts/check_reproduction.py demo       # or: sweep

What must match exactly: accuracies (per seed, per point and mode, the teacher's), learning curves
and final losses, data fingerprints and row counts, optimizer steps. What may differ: timings and the
machine record. The comparison is only meaningful on a machine whose record matches the committed
one on `mimic_fast._env.REPRODUCE` (CPU model and instruction set, torch, triton, threads): elsewhere
the script says which fields differ and still lists the figures that moved (exit 0: not comparable).
Exit 1 when the machine matches and a figure differs, 0 when everything matches.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mimic_fast import _env  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _demo_figures(doc):
    out = {}
    for run in doc["runs"]:
        s = run["seed"]
        for key in ("teacher", "student_labels", "student_mimic"):
            r = run[key]
            out[f"seed {s} {key} accuracy"] = r["accuracy"]
            for extra in ("curve", "final_soft_loss", "member_accuracy", "transfer_rows"):
                if extra in r:
                    out[f"seed {s} {key} {extra}"] = r[extra]
        for key in ("n_labelled", "n_unlabelled", "n_test"):
            out[f"seed {s} {key}"] = run[key]
    return out


def _sweep_figures(doc):
    out = {"teacher accuracy": doc["teacher"]["test_accuracy"],
           "data": {k: v for k, v in doc["data"].items()},
           "transfer": {k: v for k, v in doc["transfer"].items() if k != "note"},
           "missing": doc["missing"]}
    for p in doc["points"]:
        name = f"{p['point']} {p['mode']}"
        out[f"{name} accuracy"] = p["accuracy"]
        out[f"{name} final_loss"] = p["final_loss"]
        out[f"{name} steps"] = p["steps"]
    return out


def _run(argv, out):
    cmd = [sys.executable, "-m", "mimic_fast", *argv, "--no-progress", "--out", out]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def check(name, committed_path, argv, result_file, figures, tmp):
    with open(committed_path) as f:
        committed = json.load(f)
    out = os.path.join(tmp, name)
    _run(argv, out)
    with open(os.path.join(out, result_file)) as f:
        fresh = json.load(f)
    differs = _env.differences(committed["environment"], fresh["environment"])
    a, b = figures(committed), figures(fresh)
    moved = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    print(f"{name}: {len(a)} figures compared with {os.path.relpath(committed_path, ROOT)}; "
          f"{len(moved)} differ")
    for k in moved[:20]:
        print(f"  {k}: committed {a.get(k)!r}, now {b.get(k)!r}")
    if differs:
        print(f"{name}: not comparable: this machine differs from the committed record in "
              + ", ".join(f"{k} ({committed['environment'].get(k)!r} there, "
                          f"{fresh['environment'].get(k)!r} here)" for k in differs))
        return True
    print(f"{name}: same machine record ({_env.describe(fresh['environment'])}): "
          + ("reproduced exactly" if not moved else "NOT REPRODUCED"))
    return not moved


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    # no argparse choices: Python 3.11 checks an empty nargs="*" list against them and refuses it
    p.add_argument("what", nargs="*", metavar="demo|sweep", help="default: both")
    args = p.parse_args(argv)
    bad = [w for w in args.what if w not in ("demo", "sweep")]
    if bad:
        p.error(f"unknown {bad}: expected demo and/or sweep")
    args.what = args.what or ["demo", "sweep"]
    return args


def main(argv=None):
    args = parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory(prefix="mimic-reproduce-") as tmp:
        if "demo" in args.what:
            ok &= check("demo", os.path.join(RESULTS, "demo", "demo.json"), ["demo"], "demo.json",
                        _demo_figures, tmp)
        if "sweep" in args.what:
            ok &= check("sweep", os.path.join(RESULTS, "sweep", "sweep.json"), ["sweep"],
                        "sweep.json", _sweep_figures, tmp)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
