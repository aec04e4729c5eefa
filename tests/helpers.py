"""Input factories shared by the tests (tolerances live in mimic_fast.testing)."""
import torch

from mimic_fast.testing import eager_mlp  # noqa: F401  (re-exported for the tests)


def make_mlp_inputs(B, D, k, H, C, dtype=torch.float32, device="cpu", bias=True, lead=None,
                    requires_grad=True, scale=1.0):
    """x, U, V, b1, W, b2 drawn so that every layer's output has O(1) scale."""
    g = torch.Generator().manual_seed(1234 + B * 7 + D * 11 + k * 13 + H * 17 + C * 19)

    def rnd(*shape, std=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * std * scale).to(device, dtype)
        return t.requires_grad_(requires_grad)

    shape_x = (B, D) if lead is None else (*lead, D)
    x = rnd(*shape_x)
    U = rnd(k, D, std=D ** -0.5)
    V = rnd(H, k, std=k ** -0.5)
    W = rnd(C, H, std=H ** -0.5)
    b1 = rnd(H, std=0.5) if bias else None
    b2 = rnd(C, std=0.5) if bias else None
    return x, U, V, b1, W, b2


def to64(tensors):
    return [None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)
            for t in tensors]


class AllocationRecorder:
    """Context manager recording the element count of every tensor an ATen op returns.

    It sees every op dispatched from Python and from autograd (including backward); ops run inside
    a C++ kernel without re-dispatch are invisible to it, so for C++ backends it bounds what the
    Python/ATen layer allocates, not scratch memory inside the kernel.
    """

    def __init__(self):
        self.sizes = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        recorder.sizes.append((t.numel(), str(func)))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False

    def largest(self):
        return max(self.sizes, default=(0, None))
