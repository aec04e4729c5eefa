"""The benchmark harness of mimic_fast: providers, suites, the results schema, reports, regressions.

`main(argv)` is what `mimic-fast bench` runs: suites ops | memory | student | cpu (the CPU side by
side) | gpu (the GPU script) | model (the Triton cost model), `report` / `--report`, and
`compare BASELINE CURRENT`. Every time comes from one timer (mimic_fast._timing.interleave), every
FLOP count from mimic_fast.ops.flops, every file through results.write. It ships in the package so
that `mimic-fast bench` and `python -m mimic_fast.bench.probe` (the GPU check's first stage) work
from an installed wheel.
"""


from .cli import main

__all__ = ["main"]
