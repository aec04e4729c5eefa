"""The machine record (`mimic_fast._env`) that every result JSON carries."""
import json

import pytest
import torch

from mimic_fast import _env


def test_record_names_the_cpu_its_instruction_set_and_the_software():
    rec = _env.record()
    assert set(_env.REPRODUCE) <= set(rec)
    assert rec["torch"] == torch.__version__ and rec["threads"] == torch.get_num_threads()
    assert rec["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(rec["cpu_flags"]) <= set(_env.FLAGS) and isinstance(rec["cpu"], str) and rec["cpu"]
    assert _env.record(threads=3)["threads"] == 3
    json.dumps(rec)  # JSON-ready as it is


def test_isa_variables_are_recorded_and_make_records_differ(monkeypatch):
    base = _env.record()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    capped = _env.record()
    assert capped["isa_variables"] == {**base["isa_variables"], "ONEDNN_MAX_CPU_ISA": "SSE41"}
    assert _env.differences(base, capped) == ["isa_variables"]
    assert _env.differences(base, _env.record()) == ["isa_variables"]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert _env.differences(base, _env.record()) == []


def test_differences_name_every_field_that_decides_reproducibility():
    base = _env.record()
    for key in _env.REPRODUCE:
        assert _env.differences(base, {**base, key: "something else"}) == [key]
    # fields outside REPRODUCE (the platform string, the core count) do not count
    assert _env.differences(base, {**base, "platform": "x", "cpu_count": 99}) == []


def _check_reproduction():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_reproduction.py"
    spec = importlib.util.spec_from_file_location("check_reproduction", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_demo_and_sweep_json_carry_the_record_and_their_figures_are_compared(tmp_path,
                                                                                     monkeypatch):
    """The committed figures name the machine they reproduce on, and check_reproduction notices a
    moved accuracy (a comparison that always agreed would prove nothing)."""
    import copy
    import os

    cr = _check_reproduction()
    assert cr.parse_args([]).what == ["demo", "sweep"] and cr.parse_args(["sweep"]).what == ["sweep"]
    with pytest.raises(SystemExit):
        cr.parse_args(["dmeo"])
    for name, figures in (("demo", cr._demo_figures), ("sweep", cr._sweep_figures)):
        path = os.path.join(cr.RESULTS, name, f"{name}.json")
        with open(path) as f:
            doc = json.load(f)
        assert set(_env.REPRODUCE) <= set(doc["environment"]), name
        moved = copy.deepcopy(doc)
        if name == "demo":
            moved["runs"][-1]["student_mimic"]["accuracy"] += 1 / 360
        else:
            moved["points"][-1]["accuracy"][0] += 1 / 360
        assert figures(doc) == figures(copy.deepcopy(doc))
        assert [k for k in figures(doc) if figures(doc)[k] != figures(moved)[k]], name

        # check(): the same machine and a moved figure fail; another machine is "not comparable"
        def fake_run(argv, out, fresh=moved, name=name):
            os.makedirs(out)
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(fresh, f)

        monkeypatch.setattr(cr, "_run", fake_run)
        assert cr.check(name, path, [name], f"{name}.json", figures, str(tmp_path / "a")) is False
        monkeypatch.setattr(cr, "_run", lambda argv, out: fake_run(argv, out, fresh=doc))
        assert cr.check(name, path, [name], f"{name}.json", figures, str(tmp_path / "b")) is True
        other = copy.deepcopy(moved)
        other["environment"]["threads"] = 7
        monkeypatch.setattr(cr, "_run", lambda argv, out: fake_run(argv, out, fresh=other))
        assert cr.check(name, path, [name], f"{name}.json", figures, str(tmp_path / "c")) is True
