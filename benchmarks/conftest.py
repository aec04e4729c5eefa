"""pytest-benchmark suites of mimic_fast (helpers live in bench_common.py, not here, so that this
folder and tests/ can be collected in one session without two `conftest` modules clashing).

    pytest benchmarks/ --benchmark-json=benchmarks/results/pytest_cpu.json

Triton is never timed under TRITON_INTERPRET: on CPU the provider reports itself unavailable.
"""
