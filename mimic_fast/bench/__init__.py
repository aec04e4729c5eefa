"""Benchmarks of mimic_fast: FLOP/byte counts, providers, timers, memory probes, reports, regressions.

`main(argv)` is what `mimic-fast bench` runs (suites ops | memory | student | gpu, `--report`,
`compare BASELINE CURRENT`). Importing this package is light; suites import torch work lazily.
"""


def main(argv=None):
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
