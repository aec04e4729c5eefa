"""Environment and API probes, the first stage of scripts/gpu_check.sh (~10 s on a GPU).

    python -m mimic_fast.bench.probe --out env.json

The device (name, SMs, L2, memory, clocks), the versions (torch, triton, CUDA, nvcc, driver), and the
ATen calls the CUDA binding relies on, each tried on small random data against a float64 reference:
mm with out_dtype=float32, addmm into a float32 accumulator (out_dtype, in place), _addmm_activation
(fused bias + ReLU, and which GELU its use_gelu is), CUDA-graph capture and replay, and
set_sync_debug_mode. A probe that fails is recorded with its error; none stops the others.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from . import results


def _rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def api_probes(device):
    """{probe: {"ok": bool, ...}} for the ATen entry points csrc/cuda/cuda_ops.cpp uses."""
    out = {}
    g = torch.Generator().manual_seed(0)
    lo = torch.bfloat16
    a64, b64 = torch.randn(96, 40, generator=g, dtype=torch.float64), torch.randn(40, 72, generator=g,
                                                                                  dtype=torch.float64)
    bias64 = torch.randn(72, generator=g, dtype=torch.float64)
    a, b, bias = (t.to(device, lo) for t in (a64, b64, bias64))
    ref = a.double() @ b.double()

    def probe(name, fn):
        try:
            out[name] = {"ok": True, **(fn() or {})}
        except Exception as e:  # noqa: BLE001 - recorded, the next probe still runs
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}

    def mm_out_dtype():
        y = torch.mm(a, b, out_dtype=torch.float32)
        assert y.dtype == torch.float32
        return {"rel_err": _rel_err(y, ref)}

    def addmm_accumulate():
        acc = torch.randn(96, 72, generator=g).to(device)
        want = acc.double() + ref
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return {"rel_err": _rel_err(acc, want)}

    def addmm_activation():
        h = torch._addmm_activation(bias, a, b)
        want = torch.relu(ref + bias.double())
        hg = torch._addmm_activation(bias, a, b, use_gelu=True)
        exact = F.gelu(ref + bias.double())
        tanh = F.gelu(ref + bias.double(), approximate="tanh")
        return {"relu_rel_err": _rel_err(h, want), "gelu_vs_exact": _rel_err(hg, exact),
                "gelu_vs_tanh": _rel_err(hg, tanh)}

    def graph_capture():
        if torch.device(device).type != "cuda":
            raise RuntimeError("no CUDA device")
        x = a.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.mm(x, b)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = torch.mm(x, b)
        x.copy_(a * 2)
        graph.replay()
        torch.cuda.synchronize()
        return {"rel_err": _rel_err(y, 2 * ref)}

    def sync_debug():
        if torch.device(device).type != "cuda":
            raise RuntimeError("no CUDA device")
        torch.cuda.set_sync_debug_mode("error")
        try:
            try:
                torch.ones(1, device=device).item()
                caught = False
            except RuntimeError:
                caught = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert caught, "set_sync_debug_mode('error') did not raise on .item()"

    for name, fn in (("mm_out_dtype_float32", mm_out_dtype), ("addmm_out_dtype_accumulate", addmm_accumulate),
                     ("_addmm_activation", addmm_activation), ("cuda_graph_capture", graph_capture),
                     ("set_sync_debug_mode", sync_debug)):
        probe(name, fn)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mimic_fast.bench.probe", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = results.new_doc("probe", "python -m mimic_fast.bench.probe " + " ".join(argv or sys.argv[1:]),
                          device)
    doc["env"] = results.environment(device, tools=True)
    doc["api"] = api_probes(device)
    doc["api_device"] = device
    results.write(results.finish(doc), args.out)
    e = doc["env"]
    print(f"device: {e.get('device', 'no CUDA device')}  SMs {e.get('sms')}  L2 {e.get('l2_bytes')}  "
          f"torch {e['torch']} (CUDA {e['torch_cuda']})  triton {e['triton']}  nvcc: {e['nvcc']}")
    if e.get("nvidia_smi"):
        print(e["nvidia_smi"])
    for name, r in doc["api"].items():
        print(f"  {name:<28} {'ok' if r['ok'] else 'FAILED'}  "
              + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k != "ok"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
