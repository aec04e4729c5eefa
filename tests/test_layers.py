"""The package's layers: imports only point down, and function-level imports are only for optional or
heavy dependencies. Read from the source (AST), module-level and function-level imports alike, so an
import hidden in a function cannot hide a cycle.

LAYERS is the authoritative order (bottom first). A module may import modules of its own layer or
of lower layers; any import of a higher layer, any cycle (also inside a layer) and any module that no
layer names fail. `from . import x` and `from mimic_fast import x` count as imports of the submodule
x when x is one; importing a submodule is not counted as importing its parent packages.
"""
import ast
import fnmatch
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mimic_fast"

# bottom to top; a name ending in * places every module it matches
LAYERS = [
    ("base", ["mimic_fast._wording", "mimic_fast._env", "mimic_fast._io", "mimic_fast._timing", "mimic_fast.activations", "mimic_fast._checks", "mimic_fast.testing",
              "mimic_fast.distributed", "mimic_fast._C", "mimic_fast._C_cuda"]),
    # the backends' kernels, launchers and plans, the cost model, the compile gate, the FLOP counts
    ("ops", ["mimic_fast.ops", "mimic_fast.ops.reference", "mimic_fast.ops.flops", "mimic_fast.ops.cpu",
             "mimic_fast.ops.cuda", "mimic_fast.ops.triton_*"]),
    # dispatch loads the backends by name (importlib) and chooses among them: it sits above them
    ("dispatch", ["mimic_fast.dispatch"]),
    ("autograd", ["mimic_fast.ops.autograd"]),
    ("functional", ["mimic_fast.functional"]),
    ("nn", ["mimic_fast.nn"]),
    ("models", ["mimic_fast.models", "mimic_fast.convert", "mimic_fast.export"]),
    # the package root exposes the public ops and modules; `import mimic_fast` stays light
    ("package", ["mimic_fast"]),
    # datasets, transfer sets, recipes, identities (hashes, fingerprints), the logit store
    ("data", ["mimic_fast.data", "mimic_fast.data.*"]),
    ("files", ["mimic_fast.files"]),  # model, transfer-set and checkpoint file formats
    ("teachers", ["mimic_fast.teachers"]),
    ("train", ["mimic_fast.train"]),
    ("pipeline", ["mimic_fast.pipeline"]),
    ("entry points", ["mimic_fast.__main__", "mimic_fast.cli", "mimic_fast.sweep",
                      "mimic_fast.sweep_report", "mimic_fast.demo", "mimic_fast.bench",
                      "mimic_fast.bench.*"]),
]

# Modules built from C++/CUDA sources (no .py file); they may be absent from a build.
EXTENSIONS = {"mimic_fast._C", "mimic_fast._C_cuda"}

# What a function may import: optional dependencies and heavy ones kept out of `import mimic_fast`.
FUNCTION_LEVEL_ALLOWED = {
    "triton": "optional (no triton on macOS/Windows wheels) and ~1 s to import",
    "onnx": "optional: the export extra",
    "onnxscript": "optional: the export extra (torch.onnx's dynamo exporter needs it)",
    "onnxruntime": "optional: the export extra (checks and times the written file)",
    "matplotlib": "heavy (~0.5 s) and only for figures",
    "sklearn": "heavy (~1 s): only the digits data set and MUNGE's nearest neighbours use it",
    "torch._dynamo": "heavy (~1 s); torch.optim imports it on first use, pipeline.build_checked "
                     "before a model that may fill the address space",
    "mimic_fast._C": "compiled extension, may be absent (dispatch reports why)",
    "mimic_fast._C_cuda": "compiled extension, built only with CUDA",
    "mimic_fast.bench": "the benchmark harness, optional in an installation (`mimic-fast bench` "
                        "says so when it is missing)",
}

# ----------------------------------------------------------------------------------------------
# the checker (a function of a source tree, so the tests below can plant bugs in a copy)
# ----------------------------------------------------------------------------------------------
def modules_of(root, package=PACKAGE):
    """{module name: path} of every .py file of the package under root."""
    out = {}
    for path in sorted((Path(root) / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _function_level(tree):
    """The import nodes of a module with whether each runs inside a function."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, inner)
    visit(tree, False)
    return found


def imports_of(name, path, known, package=PACKAGE):
    """[(target, function_level, line)] of module `name`: our own modules resolved to the submodule,
    other dependencies by their top-level name."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), str(path))
    is_package = Path(path).name == "__init__.py"
    out = []
    for node, in_function in _function_level(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, in_function, node.lineno))
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        if module.split(".")[0] != package:
            out.append((module, in_function, node.lineno))
            continue
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            out.append((sub if sub in known else module, in_function, node.lineno))
    return list(dict.fromkeys(out))  # `from m import a, b`: one import of m


def layer_of(module, layers=LAYERS):
    hits = [i for i, (_, names) in enumerate(layers) for pattern in names
            if fnmatch.fnmatchcase(module, pattern)]
    return hits


def check(root, layers=LAYERS, allowed=FUNCTION_LEVEL_ALLOWED, extensions=EXTENSIONS,
          package=PACKAGE):
    """Every violation of the layering contract in the source tree at root, as text lines."""
    mods = modules_of(root, package)
    known = set(mods) | set(extensions)
    problems, edges = [], {}
    for m in sorted(known):
        hits = layer_of(m, layers)
        if len(hits) != 1:
            problems.append(f"{m} is placed in {len(hits)} layers (expected exactly one): "
                            + (", ".join(layers[i][0] for i in hits) or "add it to LAYERS"))
    for m, path in mods.items():
        for target, in_function, line in imports_of(m, path, known, package):
            where = f"{path.relative_to(root)}:{line}"
            ours = target.split(".")[0] == package
            if in_function and not any(target == a or target.startswith(a + ".") for a in allowed):
                problems.append(f"{where}: {m} imports {target} inside a function: only "
                                "optional or heavy dependencies may (FUNCTION_LEVEL_ALLOWED)")
            if not ours:
                continue
            if target not in known:
                problems.append(f"{where}: {m} imports {target}, which is not a module of {package}")
                continue
            edges.setdefault(m, set()).add(target)
            a, b = layer_of(m, layers), layer_of(target, layers)
            if len(a) == 1 and len(b) == 1 and b[0] > a[0]:
                problems.append(f"{where}: upward import: {m} (layer {layers[a[0]][0]}) imports "
                                f"{target} (layer {layers[b[0]][0]})")
    for cycle in _cycles(edges):
        problems.append("import cycle: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def _cycles(edges):
    """One cycle (a list of modules) per strongly connected component with a cycle (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(_a_cycle(sorted(component), edges))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def _a_cycle(component, edges):
    """A concrete cycle through the first module of a strongly connected component."""
    members, start = set(component), component[0]
    paths, queue = {start: [start]}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                return paths[v]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


# ----------------------------------------------------------------------------------------------
# the contract on this tree
# ----------------------------------------------------------------------------------------------
def test_imports_only_point_down_and_functions_import_only_optional_dependencies():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_import_mimic_fast_stays_light():
    code = ("import sys, mimic_fast; heavy = ('sklearn', 'matplotlib', 'onnx', 'onnxscript', "
            "'onnxruntime', 'pandas', 'scipy'); "
            "print([m for m in sys.modules if m.split('.')[0] in heavy or "
            "m.startswith(('mimic_fast.data', 'mimic_fast.train', 'mimic_fast.pipeline', "
            "'mimic_fast.cli', 'mimic_fast.bench'))])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


# ----------------------------------------------------------------------------------------------
# the checker finds what it must (planted bugs in a small package)
# ----------------------------------------------------------------------------------------------
TOY_LAYERS = [("low", ["toy.low", "toy.low2"]), ("mid", ["toy", "toy.mid"]), ("high", ["toy.high"])]


def _toy(tmp_path, files):
    pkg = tmp_path / "toy"
    pkg.mkdir()
    base = {"__init__.py": "from . import mid\n", "low.py": "import os\n", "low2.py": "",
            "mid.py": "from .low import x\n", "high.py": "from toy import mid, low\n"}
    for name, text in {**base, **files}.items():
        (pkg / name).write_text(textwrap.dedent(text))
    return check(tmp_path, TOY_LAYERS, allowed={"sklearn": "", "torch._dynamo": ""}, extensions=(), package="toy")


def test_checker_passes_a_clean_package(tmp_path):
    assert _toy(tmp_path, {}) == []


def test_checker_finds_an_upward_import_also_inside_a_function(tmp_path):
    problems = _toy(tmp_path, {"low2.py": "import toy.high\n"})
    assert problems == ["toy/low2.py:1: upward import: toy.low2 (layer low) imports toy.high "
                        "(layer high)"], problems
    (tmp_path / "toy").rename(tmp_path / "first")
    problems = _toy(tmp_path, {"low2.py": "def f():\n    from . import high\n"})
    assert problems == [
        "toy/low2.py:2: toy.low2 imports toy.high inside a function: only optional or heavy "
        "dependencies may (FUNCTION_LEVEL_ALLOWED)",
        "toy/low2.py:2: upward import: toy.low2 (layer low) imports toy.high (layer high)"], problems


def test_checker_finds_a_cycle_within_a_layer(tmp_path):
    problems = _toy(tmp_path, {"low.py": "from .low2 import y\n", "low2.py": "from . import low\n"})
    assert problems == ["import cycle: toy.low -> toy.low2 -> toy.low"], problems


def test_checker_finds_unplaced_modules_and_function_level_imports(tmp_path):
    problems = _toy(tmp_path, {"extra.py": "", "mid.py": "def f():\n    import json\n"
                                                         "    import sklearn\n"
                                                         "    import torch._dynamo\n"
                                                         "    from torch import nn\n"})
    assert problems == [  # an allowed submodule (torch._dynamo) does not allow its package
        "toy.extra is placed in 0 layers (expected exactly one): add it to LAYERS",
        "toy/mid.py:2: toy.mid imports json inside a function: only optional or heavy dependencies "
        "may (FUNCTION_LEVEL_ALLOWED)",
        "toy/mid.py:5: toy.mid imports torch inside a function: only optional or heavy dependencies "
        "may (FUNCTION_LEVEL_ALLOWED)"], problems


def test_checker_resolves_from_package_import_to_the_submodule(tmp_path):
    # toy.high's `from toy import mid, low` imports the submodules, not the package toy (layer mid),
    # and `from toy.low import name` imports toy.low
    problems = _toy(tmp_path, {"low.py": "from toy import low2\nfrom toy.low2 import name\n"})
    assert problems == [], problems
    assert [t for t, _, _ in imports_of("toy.high", tmp_path / "toy" / "high.py",
                                        {"toy", "toy.mid", "toy.low"}, "toy")] == ["toy.mid", "toy.low"]
