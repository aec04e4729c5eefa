"""torch.func.vmap over a fused student: the folded vmap rule vs a Python loop vs one plain call.

    python benchmarks/vmap_student.py [threads]      (README: "Autograd", vmap figures)

A 32L-2048 student (D=64, C=10) over 64 groups of 16 rows; 60 rounds of the harness's timer (the
three variants interleaved), medians and best rounds, after checking that vmap and the loop agree.
"""
import statistics
import sys

import torch

import mimic_fast as mf
from mimic_fast._timing import interleave


def main(threads=1, rounds=60):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = mf.nn.WideShallowStudent(64, 10, 2048, 32).eval()
    xs = torch.randn(64, 16, 64)
    vmapped = torch.func.vmap(student)
    variants = {"vmap (folded rule)": lambda: vmapped(xs),
                "python loop": lambda: torch.stack([student(x) for x in xs]),
                "one call on (1024, 64)": lambda: student(xs.reshape(-1, 64))}
    with torch.no_grad():
        torch.testing.assert_close(variants["vmap (folded rule)"](), variants["python loop"]())
        times, errors = interleave(variants, rounds=rounds)
    if errors:
        raise next(iter(errors.values()))
    print(f"threads {threads}: " + ", ".join(f"{name} {statistics.median(t) * 1e3:.2f} ms (best "
                                             f"{min(t) * 1e3:.2f})" for name, t in times.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
