"""Turn trained layers into mimic_fast's and back: SVD factorisation, fusion of student chains found
by torch.fx in any model, unfusion to plain layers, and the state-dict keys between the two.

fuse_student traces the model (torch.fx) and matches, in its graph,
    Linear(D, k) → Linear(k, H) → act → Linear(H, C)        (or BottleneckLinear → act → Linear)
with inference-time Dropout / Identity anywhere in between. Linears must be modules; the activation
may be a module or a call (F.relu, torch.tanh, F.gelu exact, x.sigmoid(), ...). Only exact types
match: a subclass with its own forward, a parametrised layer or one with forward hooks is left
alone and reported. Chains made only of modules are fused in place (the student takes the first
Linear's name, the other layers become nn.Identity or leave their nn.Sequential); a chain with a
functional step needs a new forward, so the result is then a torch.fx.GraphModule. A model that
torch.fx cannot trace is searched submodule by submodule, and the report says so.
"""
import warnings
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src
from torch.nn.utils import parametrize

from ._checks import check_int_at_least
from .activations import ACTIVATION_MODULES, ACTIVATIONS
from .nn import BottleneckLinear, WideShallowStudent

__all__ = ["factorize_linear", "fuse_student", "unfuse", "mimic_loss_of", "FusionReport"]


def factorize_linear(linear, rank):
    """The best rank-`rank` BottleneckLinear approximation (truncated SVD) of a trained nn.Linear.

    With weight = P Σ Qᵀ, U = √Σ_r Q_rᵀ and V = P_r √Σ_r, so ‖weight − V U‖ is minimal
    (Eckart–Young); the bias is copied. Computed in float64, stored in the layer's dtype and device.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    out_features, in_features = linear.weight.shape
    check_int_at_least("rank", rank, 1)
    if rank > min(out_features, in_features):
        raise ValueError(f"rank must be at most min(out_features, in_features) = "
                         f"{min(out_features, in_features)} for a Linear({in_features}, "
                         f"{out_features}), got {rank}")
    w = linear.weight.detach()
    P, S, Qh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    layer = BottleneckLinear(in_features, rank, out_features, bias=linear.bias is not None,
                             device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.U.copy_(root[:, None] * Qh[:rank])
        layer.V.copy_(P[:, :rank] * root[None, :])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer


# ---------------------------------------------------------------------------------------- report
@dataclass
class FusedChain:
    student: str                 # where the WideShallowStudent now lives ("" for the root)
    layers: List[str]            # the fused steps, in order (module names or function names)
    activation: str
    sizes: Tuple[int, int, int, int]  # D, k, H, C
    notes: List[str] = field(default_factory=list)


@dataclass
class FusionReport:
    """What fuse_student did: `fused` chains, `left` (where, why) near-misses left alone, the modules
    torch.fx traced, and those it could not (name, error) whose children were searched instead."""

    fused: List[FusedChain] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)
    traced: List[str] = field(default_factory=list)
    untraced: List[Tuple[str, str]] = field(default_factory=list)
    graph_module: bool = False  # the result is a new torch.fx.GraphModule (functional steps fused)

    def __bool__(self):
        return bool(self.fused)

    def __str__(self):
        lines = [f"fuse_student: {len(self.fused)} chain(s) fused"
                 + (" (the result is a torch.fx.GraphModule: use the returned model)"
                    if self.graph_module else "")]
        for c in self.fused:
            D, k, H, C = c.sizes
            lines.append(f"  fused {' -> '.join(c.layers)} as WideShallowStudent "
                         f"{_name(c.student)} (D={D}, k={k}, H={H}, C={C}, {c.activation})")
            lines += [f"    note: {n}" for n in c.notes]
        for where, why in self.left:
            lines.append(f"  left alone {where}: {why}")
        for where, error in self.untraced:
            lines.append(f"  torch.fx could not trace {where} ({error}); searched its submodules "
                         "one by one instead")
        if not self.fused and not self.left:
            lines.append("  no Linear -> Linear -> act -> Linear chain found (a Linear -> act -> Linear "
                         "has no bottleneck: factorize_linear its first layer first)")
        return "\n".join(lines)


def _name(path):
    return repr(path) if path else "(the model itself)"


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------- the pattern
_ACT_MODULES = {module: name for name, module in ACTIVATION_MODULES.items()}  # class -> name
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                  torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)
_KINDS = (nn.Linear, BottleneckLinear, nn.Identity, *_DROPOUTS, *_ACT_MODULES)


class _Tracer(fx.Tracer):
    # Linear/activation/dropout subclasses stay leaves, so they show up as modules and are reported
    # rather than traced through; a fused student is never re-entered.
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (*_KINDS, WideShallowStudent)) or super().is_leaf_module(m, qualname)


def _trace(module):
    return _Tracer().trace(module)


def _base(m):
    return next((k for k in _KINDS if isinstance(m, k)), None)


def _why_not_exact(m):
    """Why a module of a fusable kind cannot be fused as that kind (None: it can)."""
    base = _base(m)
    if parametrize.is_parametrized(m):
        return (f"{type(m).__name__} is parametrised ({', '.join(m.parametrizations)}): its weight "
                "is recomputed at each call; remove the parametrisation first "
                "(torch.nn.utils.parametrize.remove_parametrizations)")
    if type(m) is not base and type(m).forward is not base.forward:
        return (f"{type(m).__name__} subclasses {base.__name__} with its own forward "
                "(only exact types are fused)")
    if m._forward_hooks or m._forward_pre_hooks:
        return f"{type(m).__name__} has forward hooks (e.g. the old torch.nn.utils.weight_norm)"
    return None


def _dropout_passes(p, training, label):
    if p == 0 or not training:
        return None
    return (f"{label} is active (training mode, p={p}): call model.eval() to fuse for inference "
            "(the fused model applies no dropout)")


def _pass_through(node, modules):
    """(passes, reason): passes=True for an identity at inference (Identity, inactive Dropout)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.Identity, *_DROPOUTS)):
            why = _why_not_exact(m)
            if why is None and isinstance(m, _DROPOUTS):
                why = _dropout_passes(m.p, m.training, f"{node.target} ({type(m).__name__})")
            return why is None, why
    if node.op == "call_function" and node.target is F.dropout:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        why = _dropout_passes(p, training, f"{node.name} (F.dropout)")
        return why is None, why
    return False, None


def _activation(node, modules):
    """(name, reason): the fused activation this node computes, or why it is not one."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, tuple(_ACT_MODULES)):
            why = _why_not_exact(m)
            if why is None and isinstance(m, nn.GELU) and m.approximate != "none":
                why = f"GELU(approximate={m.approximate!r}): only the exact erf form is fused"
            return (None, why) if why else (_ACT_MODULES[_base(m)], None)
        return None, f"{type(m).__name__} is not a fused activation ({', '.join(ACTIVATIONS)})"
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if node.target is F.gelu and approx != "none":
            return None, f"F.gelu(approximate={approx!r}): only the exact erf form is fused"
        return _ACT_FUNCTIONS[node.target], None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target], None
    what = getattr(node.target, "__name__", node.target)
    return None, f"{what} is not a fused activation ({', '.join(ACTIVATIONS)})"


def _linear(node, modules, kind=nn.Linear):
    """The module at node if it is a usable exact `kind`, else None."""
    if node.op != "call_module":
        return None
    m = modules[node.target]
    return m if isinstance(m, kind) and _why_not_exact(m) is None else None


def _label(node):
    if node.op == "call_module":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


@dataclass
class _Chain:
    nodes: list          # every fx node of the chain, in order
    roles: list          # "linear1" | "linear2" | "act" | "pass" | "linear3" | "bottleneck"
    student: WideShallowStudent
    folded: bool


class _Miss(Exception):
    pass


def _follow(node, modules):
    """The node consuming `node`'s output past any pass-through steps: (node, passes)."""
    passes = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise _Miss(f"the output of {_label(node)} is used {len(users)} times")
        user = users[0]
        if not user.args or user.args[0] is not node or len(user.args) > 1 and any(
                a is node for a in user.args[1:]):
            raise _Miss(f"{_label(user)} takes {_label(node)} in another position")
        ok, why = _pass_through(user, modules)
        if why:
            raise _Miss(why)
        if not ok:
            return user, passes
        passes.append(user)
        node = user


def _params_agree(layers, where):
    tensors = [p for m in layers for p in m.parameters(recurse=False)]
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise _Miss(f"{where}: parameters differ in dtype/device ({sorted(map(str, kinds))})")


def _match(first, modules):
    """A _Chain starting at node `first`, or raise _Miss (the near-miss reason), or return None."""
    nodes, roles = [first], []
    m1 = _linear(first, modules, BottleneckLinear)
    if m1 is not None and type(m1) is BottleneckLinear:
        roles.append("bottleneck")
        U, V, b1, c, cur, layers = m1.U, m1.V, m1.bias, None, first, [m1]
    else:
        m1 = _linear(first, modules)
        if m1 is None:
            return None
        roles.append("linear1")
        try:
            second, passes = _follow(first, modules)
        except _Miss:
            return None
        m2 = _linear(second, modules)
        if m2 is None or m2.in_features != m1.out_features:
            if second.op == "call_module" and isinstance(modules[second.target], nn.Linear):
                why = _why_not_exact(modules[second.target])
                if why:
                    raise _Miss(why)
            return None  # a Linear not followed by a Linear: not a bottleneck
        nodes += passes + [second]
        roles += ["pass"] * len(passes) + ["linear2"]
        U, V, b1, c, cur, layers = m1.weight, m2.weight, m2.bias, m1.bias, second, [m1, m2]
    act_node, passes = _follow(cur, modules)
    activation, why = _activation(act_node, modules)
    if activation is None:
        raise _Miss(why)
    nodes += passes + [act_node]
    roles += ["pass"] * len(passes) + ["act"]
    last, passes = _follow(act_node, modules)
    m3 = _linear(last, modules)
    if m3 is None:
        if last.op == "call_module" and isinstance(modules[last.target], nn.Linear):
            raise _Miss(_why_not_exact(modules[last.target]))
        raise _Miss(f"{_label(last)} follows the activation where a Linear({V.shape[0]}, C) "
                    "was expected")
    if m3.in_features != V.shape[0]:
        raise _Miss(f"{last.target} takes {m3.in_features} features but the hidden layer has "
                    f"{V.shape[0]}")
    nodes += passes + [last]
    roles += ["pass"] * len(passes) + ["linear3"]
    _params_agree(layers + [m3], " -> ".join(_label(n) for n in nodes))
    D, k, H, C = U.shape[1], U.shape[0], V.shape[0], m3.out_features
    folded = c is not None
    student = WideShallowStudent(D, C, H, k, activation,
                                 bias=(b1 is not None or folded, m3.bias is not None), device="meta")
    # Share the trained Parameters themselves, so optimizers holding them keep working.
    student.U, student.V, student.W, student.b2 = U, V, m3.weight, m3.bias
    if folded:  # x Uᵀ + c then V: the bias reaches the hidden layer as V c (exact)
        with torch.no_grad():
            b = V.double() @ c.double() + (0 if b1 is None else b1.double())
        student.b1 = nn.Parameter(b.to(V.dtype), requires_grad=c.requires_grad)
    else:
        student.b1 = b1
    return _Chain(nodes, roles, student, folded)


def _find(graph, modules, prefix, report):
    chains, used = [], set()
    counts = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
            m = modules[n.target]
            if _base(m) is not None and type(m) is not WideShallowStudent:
                why = _why_not_exact(m)
                if why:
                    report.left.append((repr(_join(prefix, n.target)), why))
    for n in graph.nodes:
        if n in used:
            continue
        try:
            chain = _match(n, modules)
        except _Miss as e:
            if not any(why == str(e) for _, why in report.left):  # said once, at the module
                report.left.append((f"the chain from {_join(prefix, _label(n))!r}", str(e)))
            continue
        if chain is None or any(x in used for x in chain.nodes):
            continue
        shared = [x.target for x in chain.nodes if x.op == "call_module" and counts[x.target] > 1]
        if shared:
            report.left.append((f"the chain from {_join(prefix, _label(n))!r}",
                                f"{', '.join(shared)} is called more than once in forward"))
            continue
        used.update(chain.nodes)
        chains.append(chain)
    report.left = list(dict.fromkeys(report.left))  # one line per reason
    return chains


# ----------------------------------------------------------------------------------- applying it
def _set_submodule(root, path, module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _record(chain, prefix, student_path):
    """What unfuse and the state-dict hook need: every step's path, role and module."""
    return {"student": _join(prefix, student_path), "folded": chain.folded,
            "steps": [(r, _join(prefix, n.target) if n.op == "call_module" else None,
                       n.target if n.op != "call_module" else None)
                      for r, n in zip(chain.roles, chain.nodes)]}


def _in_place(module, chains, prefix):
    records = []
    for chain in chains:
        paths = [n.target for n in chain.nodes]
        record = _record(chain, prefix, paths[0])
        record["modules"] = {_join(prefix, p): module.get_submodule(p)  # act, Dropout, Identity
                             for p, r in zip(paths, chain.roles) if r in ("act", "pass")}
        record["orders"] = {}
        for p in paths[1:]:
            parent_path, _, name = p.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            if type(parent) is nn.Sequential:  # leave the Sequential (its forward just iterates)
                record["orders"].setdefault(_join(prefix, parent_path), list(parent._modules))
                del parent._modules[name]
            else:
                setattr(parent, name, nn.Identity())
        _set_submodule(module, paths[0], chain.student)
        records.append(record)
    return module, records


class _FusedGraphModule(fx.GraphModule):
    """A fused GraphModule that keeps loading pre-fusion state dicts after torch.save(model) /
    torch.load: GraphModule's unpickling rebuilds a plain GraphModule and drops every
    load_state_dict hook, so this one re-registers the key remapping when it is rebuilt."""

    def __reduce__(self):
        _, (body, import_block) = super().__reduce__()
        return _unpickle_fused_graph_module, (body, import_block)


def _unpickle_fused_graph_module(body, import_block):
    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    gm = _deserialize_graph_module(forward, body, graph_module_cls=_FusedGraphModule)
    if getattr(gm, "_mimic_fast_fusion", None):  # unfuse() deletes it: nothing left to remap
        gm.register_load_state_dict_pre_hook(_remap_old_keys)
    return gm


def _rewrite(module, graph, chains, prefix):
    records = []
    for chain in chains:
        first, last = chain.nodes[0], chain.nodes[-1]
        path = first.target
        with graph.inserting_before(last):
            new = graph.call_module(path, args=(first.args[0],))
        last.replace_all_uses_with(new)
        for n in reversed(chain.nodes):
            graph.erase_node(n)
        records.append((chain, path))
    gm = _FusedGraphModule(module, graph, class_name=f"Fused{type(module).__name__}")
    out = []
    for chain, path in records:
        _set_submodule(gm, path, chain.student)
        record = _record(chain, prefix, path)
        record["graph"], record["target"] = prefix, path  # the GraphModule and its call_module target
        record["graph_modules"] = {_join(prefix, n.target): module.get_submodule(n.target)
                                   for n, r in zip(chain.nodes, chain.roles)
                                   if n.op == "call_module" and r in ("act", "pass")}
        out.append(record)
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(module.training)
    return gm, out


def _fuse(module, prefix, report):
    """The fused module (module itself, or a GraphModule) and the records of its chains."""
    if isinstance(module, WideShallowStudent):
        return module, []
    try:
        graph = _trace(module)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on Proxy bool(), ...)
        report.untraced.append((repr(prefix) if prefix else type(module).__name__,
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        records = []
        for name, child in list(module.named_children()):
            new, sub = _fuse(child, _join(prefix, name), report)
            if new is not child:
                setattr(module, name, new)
            records += sub
        return module, records
    report.traced.append(prefix or type(module).__name__)
    chains = _find(graph, dict(module.named_modules()), prefix, report)
    if not chains:
        return module, []
    if all(n.op == "call_module" for c in chains for n in c.nodes):
        return _in_place(module, chains, prefix)
    report.graph_module = report.graph_module or not prefix
    return _rewrite(module, graph, chains, prefix)


def _notes(record, modules):
    notes = []
    if record["folded"]:
        first = record["steps"][0][1]
        notes.append(f"{first}'s bias is folded into b1 (b1' = b1 + V c; outputs are exact): one "
                     "new Parameter b1' replaces the two biases, and V's gradient no longer has the "
                     "V c term (re-create optimizers; for identical training use a bias-free "
                     f"{first})")
    for role, path, fn in record["steps"]:
        if role == "pass" and (path is None or isinstance(modules.get(path), _DROPOUTS)
                               and modules[path].p > 0):
            notes.append(f"{path or 'F.dropout'} was a no-op here (inference) and is not applied by "
                         "the fused model")
    return notes


def fuse_student(model, report=False):
    """Replace every Linear(no bias) → Linear → act → Linear chain (or BottleneckLinear → act →
    Linear) in `model` by a WideShallowStudent holding the same Parameters; outputs and gradients
    are unchanged. Returns the fused model — `model` itself, changed in place, unless a chain had a
    functional step (F.relu, torch.tanh, ...), then a torch.fx.GraphModule — and, with
    report=True, `(model, FusionReport)`. Warns (with the report) when nothing was fused.

    Also matched: Dropout/Identity between the layers (dropout only when inactive: call
    model.eval() first; the fused model then applies none), no b1 or no b2, and a first Linear with
    a bias c, folded into b1' = b1 + V c. Exact types only: subclasses with their own forward,
    parametrised layers and layers with hooks are left alone and reported. The fused model loads
    state dicts saved before fusion (keys are remapped on load, also after torch.save(model) and
    torch.load); unfuse() reverses the fusion.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rep = FusionReport()
    before = dict(model.named_modules())
    fused, records = _fuse(model, "", rep)
    for record in records:
        st = fused.get_submodule(record["student"])
        layers = [path or (f"{fn.__name__}()" if callable(fn) else f".{fn}()")
                  for _, path, fn in record["steps"]]
        rep.fused.append(FusedChain(record["student"], layers, st.activation,
                                    (st.in_features, st.bottleneck, st.hidden, st.num_classes),
                                    _notes(record, before)))
    if records:
        old = getattr(fused, "_mimic_fast_fusion", None)
        if old is None:
            fused.register_load_state_dict_pre_hook(_remap_old_keys)
        fused._mimic_fast_fusion = (old or []) + records
    else:
        warnings.warn(str(rep), stacklevel=2)
    return (fused, rep) if report else fused


# -------------------------------------------------------------------------------- state dicts
def _key_map(record):
    """{key before fusion: key after} for one fused chain."""
    s = record["student"]
    linears = {r: p for r, p, _ in record["steps"] if r in ("linear1", "linear2", "linear3",
                                                                   "bottleneck")}
    out = {}
    if "bottleneck" in linears:
        p = linears["bottleneck"]
        out.update({f"{p}.U": f"{s}.U", f"{p}.V": f"{s}.V", f"{p}.bias": f"{s}.b1"})
    else:
        out.update({f"{linears['linear1']}.weight": f"{s}.U",
                    f"{linears['linear2']}.weight": f"{s}.V",
                    f"{linears['linear2']}.bias": f"{s}.b1"})
    out.update({f"{linears['linear3']}.weight": f"{s}.W", f"{linears['linear3']}.bias": f"{s}.b2"})
    return out, (f"{linears['linear1']}.bias" if record["folded"] else None)


def _remap_old_keys(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: a state dict saved before fusion loads into the fused model."""
    for record in getattr(module, "_mimic_fast_fusion", ()):
        mapping, folded_bias = _key_map(record)
        mapping = {prefix + a: prefix + b for a, b in mapping.items()}
        if any(b in state_dict for b in mapping.values()):
            continue  # already a fused state dict
        for old, new in mapping.items():
            if old in state_dict:
                state_dict[new] = state_dict.pop(old)
        if folded_bias is not None and prefix + folded_bias in state_dict:
            c = state_dict.pop(prefix + folded_bias)
            s = prefix + record["student"]
            V, b1 = state_dict[f"{s}.V"], state_dict.get(f"{s}.b1")
            b = V.double() @ c.double() + (0 if b1 is None else b1.double())
            state_dict[f"{s}.b1"] = b.to(V.dtype)


# ------------------------------------------------------------------------------------- unfuse
def _plain_linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight, layer.bias = weight, bias
    return layer


def plain_layers(student):
    """nn.Sequential(Linear(D, k, bias=False), Linear(k, H), act, Linear(H, C)) sharing the
    student's Parameters: the same function as plain PyTorch layers."""
    if not isinstance(student, WideShallowStudent):
        raise TypeError(f"student must be a WideShallowStudent, got {type(student).__name__}")
    return nn.Sequential(_plain_linear(student.U, None), _plain_linear(student.V, student.b1),
                         ACTIVATION_MODULES[student.activation](), _plain_linear(student.W, student.b2))


def _plain_by_role(student, record):
    plain = plain_layers(student)
    if record["folded"]:  # the first bias's value lives on in b1 (b1' = b1 + V c): a zero bias
        U = student.U     # keeps the original keys (a strict load into the original model works)
        plain[0].bias = nn.Parameter(torch.zeros(U.shape[0], dtype=U.dtype, device=U.device),
                                     requires_grad=U.requires_grad)
    return {"linear1": plain[0], "linear2": plain[1], "linear3": plain[3]}


def _restore(model, record):
    student = model.get_submodule(record["student"])
    by_role = _plain_by_role(student, record)
    if record["steps"][0][0] == "bottleneck":
        first = BottleneckLinear(student.in_features, student.bottleneck, student.hidden,
                                 bias=student.b1 is not None, device="meta")
        first.U, first.V, first.bias = student.U, student.V, student.b1
        by_role["bottleneck"] = first
    for role, path, _ in record["steps"]:
        module = by_role[role] if role in by_role else record["modules"][path]
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if parent_path in record["orders"]:
            parent._modules[name] = module
        else:
            setattr(parent, name, module)
    for parent_path, order in record["orders"].items():
        parent = model.get_submodule(parent_path) if parent_path else model
        parent._modules = type(parent._modules)((k, parent._modules[k]) for k in order)


def _restore_graph(model, record):
    prefix, local = record["graph"], record["target"]
    gm = model.get_submodule(prefix) if prefix else model
    student = gm.get_submodule(local)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == local)
    by_role = _plain_by_role(student, record)
    cur = node.args[0]
    with gm.graph.inserting_before(node):
        for role, step_path, fn in record["steps"]:
            if step_path is None:
                if role == "pass":
                    continue  # an inactive F.dropout
                cur = (gm.graph.call_function(fn, (cur,)) if callable(fn)
                       else gm.graph.call_method(fn, (cur,)))
                continue
            target = step_path[len(prefix) + 1:] if prefix else step_path
            module = by_role[role] if role in by_role else record["graph_modules"][step_path]
            if target != local:
                gm.add_submodule(target, module)
            cur = gm.graph.call_module(target, (cur,))
    node.replace_all_uses_with(cur)
    gm.graph.erase_node(node)
    _set_submodule(gm, local, by_role.get(record["steps"][0][0], student))
    gm.recompile()


def unfuse(model):
    """Undo fuse_student: plain nn.Linear layers (and the original activation, Dropout, Identity
    modules) sharing the student's Parameters, with the same outputs; a chain fused in place gets
    its original names back, so its state dict has the pre-fusion keys (a folded first-layer bias
    comes back as zeros, its value staying folded into the second layer's). Any other
    WideShallowStudent becomes nn.Sequential(Linear, Linear, act, Linear) under its own name.
    Changes `model` in place and returns it (a new Sequential when `model` itself is a
    WideShallowStudent)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, WideShallowStudent):
        return plain_layers(model)
    for record in reversed(getattr(model, "_mimic_fast_fusion", [])):
        if "modules" in record:  # fused in place: put the original layers back
            _restore(model, record)
        else:  # fused by rewriting the graph: put the original steps back into it
            _restore_graph(model, record)
    if hasattr(model, "_mimic_fast_fusion"):
        del model._mimic_fast_fusion  # the pre-hook becomes a no-op
    for name, m in list(model.named_modules()):
        if isinstance(m, WideShallowStudent):
            _set_submodule(model, name, plain_layers(m))
    return model


# ------------------------------------------------------------------------- fused training loss
def mimic_loss_of(model):
    """A function (x, teacher_logits, reduction="mean") -> loss that runs `model`'s last
    WideShallowStudent as the fused mimic_loss op, or None if the model has no such student.

    Uses model.mimic_loss when it exists; otherwise the model must end in a WideShallowStudent
    whose output is the model's output (found with torch.fx): what comes before it runs as usual.
    """
    if callable(getattr(model, "mimic_loss", None)):
        return model.mimic_loss
    if not any(isinstance(m, WideShallowStudent) for m in model.modules()):
        return None
    try:
        graph = _trace(model)
    except Exception:
        return None
    out = next(n for n in graph.nodes if n.op == "output")
    node = out.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1 or not \
            isinstance(model.get_submodule(node.target), WideShallowStudent) or len(node.args) != 1:
        return None
    student = model.get_submodule(node.target)
    out.args = (node.args[0],)
    graph.erase_node(node)
    body = fx.GraphModule(model, graph)
    body.graph.eliminate_dead_code()
    body.recompile()

    def loss(x, teacher_logits, reduction="mean"):
        return student.mimic_loss(body(x), teacher_logits, reduction)

    return loss
