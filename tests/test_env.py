"""The machine record (`mimic_fast._env`) that every result JSON carries."""
import json

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
