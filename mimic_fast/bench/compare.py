"""Regression check: a run against a saved baseline, by record name; slowdowns beyond a threshold fail.

Only records that are "ok" in both files are compared (median time). A record that was ok in the
baseline and fails now (error, incorrect, oom) is a regression too; one missing from the run is
listed but, since a run may choose fewer cases, does not fail unless strict=True. A run in which no
baseline record found its counterpart fails.
"""
from .results import load


def _index(doc):
    return {r["name"]: r for r in doc["results"] if r.get("name")}


def compare(baseline, current, threshold=0.10, strict=False):
    """Rows {name, baseline_ms, current_ms, ratio, verdict} and whether the run regressed.

    verdict: "slower" (ratio > 1 + threshold), "faster" (ratio < 1 / (1 + threshold)), "same",
    "broken" (ok before, not now), "missing" (not in the run), "new" (not in the baseline).
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    b, c = _index(baseline), _index(current)
    rows = []
    for name, rb in b.items():
        rc = c.get(name)
        row = {"name": name, "baseline_ms": rb.get("median_ms"), "current_ms": None, "ratio": None}
        if rb.get("status", "ok") != "ok" or rb.get("median_ms") is None:
            continue  # nothing to regress from (skipped/failed or memory-only in the baseline)
        if rc is None:
            row["verdict"] = "missing"
        elif rc.get("status", "ok") != "ok" or rc.get("median_ms") is None:
            row["verdict"] = "broken"
            row["error"] = rc.get("error") or rc.get("status")
        else:
            row["current_ms"] = rc["median_ms"]
            row["ratio"] = rc["median_ms"] / rb["median_ms"]
            row["verdict"] = ("slower" if row["ratio"] > 1 + threshold else
                              "faster" if row["ratio"] < 1 / (1 + threshold) else "same")
        rows.append(row)
    rows += [{"name": n, "baseline_ms": None, "current_ms": r.get("median_ms"), "ratio": None,
              "verdict": "new"} for n, r in c.items() if n not in b and r.get("median_ms") is not None]
    bad = {"slower", "broken"} | ({"missing"} if strict else set())
    # A run that matched no baseline record proves nothing: that is a failure, not "0 slower".
    return rows, any(r["verdict"] in bad for r in rows) or matched(rows) == 0


MATCHED = ("same", "slower", "faster", "broken")


def matched(rows):
    """How many baseline records found their counterpart in the run."""
    return sum(r["verdict"] in MATCHED for r in rows)


def device_mismatch(baseline, current):
    """A warning string when the two files were measured on different devices, else None."""
    db, dc = (baseline.get("env") or {}).get("device"), (current.get("env") or {}).get("device")
    if db and dc and db != dc:
        return f"baseline measured on {db!r}, this run on {dc!r}: times are not comparable"
    return None


def format_rows(rows, threshold):
    out = [f"{'verdict':<8} {'ratio':>7} {'baseline ms':>12} {'current ms':>11}  name"]
    order = {"broken": 0, "slower": 1, "missing": 2, "faster": 3, "same": 4, "new": 5}
    for r in sorted(rows, key=lambda r: (order[r["verdict"]], r["name"])):
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        bms = f"{r['baseline_ms']:.3f}" if r["baseline_ms"] is not None else "-"
        cms = f"{r['current_ms']:.3f}" if r["current_ms"] is not None else "-"
        extra = f"  ({r['error']})" if r.get("error") else ""
        out.append(f"{r['verdict']:<8} {ratio:>7} {bms:>12} {cms:>11}  {r['name']}{extra}")
    n_slow = sum(r["verdict"] == "slower" for r in rows)
    n_broken = sum(r["verdict"] == "broken" for r in rows)
    out.append(f"{n_slow} slower than {1 + threshold:.2f}x the baseline, {n_broken} broken, "
               f"{matched(rows)} matched of {len(rows)} rows")
    if matched(rows) == 0:
        out.append("error: no record of the run matched a record of the baseline (other names, shapes "
                   "or devices?): nothing was compared")
    return "\n".join(out)


def compare_files(baseline_path, current_path, threshold=0.10, strict=False, out=print):
    """Print the comparison; return the exit status (1 when the run regressed, else 0)."""
    baseline, current = load(baseline_path), load(current_path)
    warn = device_mismatch(baseline, current)
    if warn:
        out(f"warning: {warn}")
    rows, regressed = compare(baseline, current, threshold, strict)
    out(format_rows(rows, threshold))
    return 1 if regressed else 0
