"""`mimic-fast sweep`: the compression curve — test accuracy against size and speed of students
trained on labels and by mimicry, beside their teacher (Ba & Caruana 2014; Urban et al. 2017).

One teacher (a checkpoint, an ensemble of them, or trained here with the demo's recipe) labels one
transfer set (training split only: labelled + unlabelled + generated rows) once; every grid point
(conv layers x bottleneck x width) is then trained twice per seed, on the labelled rows and on the
stored logits, with the same architecture, initial weights, optimiser, schedule, batch size and
number of optimizer steps (the labelled rows are cycled up to the transfer set's length).
The teacher, transfer set and logits are the pipeline's (mimic_fast.pipeline), in its layout: OUT holds
transfer.pt and logits/ as a collect-logits folder does (`mimic-fast distill --logits OUT` trains on
them) and a trained teacher's members are OUT/teacher/member-i/teacher.pt. Each run is a folder under
OUT/points/ built on train.py's atomic checkpoints, so a killed sweep resumes with the same command
and `--shard i/n` runs every n-th run; the report (sweep.json, .png, .md) gathers whatever runs
exist. Every JSON file of a sweep records the sha256 of its content (files.write_json) and is
refused when it does not match; a finished mimic run records the identities of the logits and
transfer set it trained on, and a sweep whose logits changed since refuses to mix them in. Limits:
the teacher and the transfer set live in memory; shards must share OUT on one file system (the
first one prepares the teacher and logits under a lock; the others wait for it, and for the store).
"""
import argparse
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, _env, sweep_report
from . import pipeline as P
from . import train as T
from ._checks import INT64_MAX, is_int
from ._io import LockedError, atomic_write_text, writer_lock
from .data import DATASETS, state_hash
from .data.recipe import DATA_FIELDS, check_recipe
from .data.transfer import METHODS
from .demo import DemoConfig
from .distributed import default_device
from .files import load_checkpoint, load_model, read_json, write_json
from .models import build_model, count_parameters
from .nn import WideShallowStudent

__all__ = ["SweepConfig", "Run", "grid", "shard", "run", "report", "add_arguments",
           "config_from_args", "main"]

FORMAT = "mimic_fast.sweep/2"  # 2: every JSON file checksummed, runs bound to their inputs
RESULT_FORMAT = "mimic_fast.sweep_run/2"
CONFIG_NAME = "sweep-config.json"
MODES = ("labels", "mimic")
_DEMO = DemoConfig()  # the teacher recipe and the student defaults are the demo's: one place


@dataclass
class SweepConfig:
    # data
    dataset: str = "digits"
    data: str = None
    split_seed: int = None  # None: the --teacher's recorded one, else 0
    label_fraction: float = None  # None: the --teacher's recorded one, else 0.15 on digits (the
    # demo's), 1.0 on other data
    # teacher: checkpoint(s) written by save_model (several: an ensemble); () trains one here
    teacher: tuple = ()
    teacher_members: int = _DEMO.teacher_members
    teacher_epochs: int = _DEMO.teacher_epochs
    teacher_batch: int = _DEMO.teacher_batch
    teacher_lr: float = _DEMO.teacher_lr
    teacher_channels: tuple = _DEMO.teacher_channels  # images: the demo's CNN
    teacher_hidden: tuple = _DEMO.teacher_hidden
    teacher_dnn_hidden: tuple = (512, 512)  # flat rows (an npz of vectors): a DNN of this shape
    teacher_dropout: float = _DEMO.teacher_dropout
    # transfer set
    n_generated: int = _DEMO.n_generated
    method: str = "munge"
    # the grid
    hidden: tuple = (32, 128, 512, 2048, 8192)
    bottleneck: tuple = (_DEMO.student_bottleneck,)
    conv_layers: tuple = (0,)
    conv_channels: int = 32
    seeds: int = 2
    # student training, shared by both modes. Adam: it is invariant to the scale of the loss, so one
    # lr serves cross-entropy and logit regression alike (SGD would need a different lr per loss)
    epochs: int = _DEMO.mimic_epochs
    batch_size: int = _DEMO.mimic_batch
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = _DEMO.weight_decay
    schedule: str = "cosine"
    # train.PRECISIONS, for the teacher trained here, every student and their measurements
    precision: str = _DEMO.precision
    # measurement and placement (not part of the recipe)
    throughput_batches: tuple = (1, 256)
    throughput_time: float = 0.2
    device: str = None
    threads: int = _DEMO.threads

    # fields that do not change what a run computes: they may differ between invocations on one OUT
    # (not the timed batch sizes: every run of a report must have a figure for each of them)
    PLACEMENT = ("hidden", "bottleneck", "conv_layers", "seeds", "throughput_time", "device",
                 "threads")

    def resolved(self):
        """A copy with the split seed and label fraction resolved (unset: as recorded in the first
        --teacher file, as the cli's pipeline commands do) and sequences as tuples of ints."""
        cfg = SweepConfig(**asdict(self))
        if cfg.teacher and (cfg.split_seed is None or cfg.label_fraction is None):
            recorded = load_model(cfg.teacher[0])[1].get("data") or {}
            for name in ("split_seed", "label_fraction"):
                if getattr(cfg, name) is None:
                    setattr(cfg, name, recorded.get(name))
        if cfg.split_seed is None:
            cfg.split_seed = 0
        if cfg.label_fraction is None:
            cfg.label_fraction = _DEMO.label_fraction if cfg.dataset == "digits" else 1.0
        cfg.teacher = tuple(str(p) for p in cfg.teacher)
        for name in ("teacher_channels", "teacher_hidden", "teacher_dnn_hidden"):
            setattr(cfg, name, tuple(int(v) for v in getattr(cfg, name)))
        for name in ("hidden", "bottleneck", "conv_layers", "throughput_batches"):  # sets: no repeats
            setattr(cfg, name, tuple(dict.fromkeys(int(v) for v in getattr(cfg, name))))
        return cfg

    def validate(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset != "digits" and self.data is None:
            raise ValueError(f"dataset {self.dataset} needs --data PATH")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.check_grid()
        for name in ("seeds", "epochs", "batch_size", "teacher_members", "teacher_epochs",
                     "teacher_batch", "conv_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_generated < 0:
            raise ValueError(f"n_generated must be >= 0, got {self.n_generated}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not self.throughput_time > 0:
            raise ValueError(f"throughput_time must be > 0 seconds, got {self.throughput_time}")
        for p in self.teacher:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"teacher file {p} does not exist: expected a .pt written by "
                                        "`mimic-fast train-teacher` (or save_model)")
        T.TrainConfig(**self.training()).validate()
        default_device(self.device)  # an unusable --device is refused before anything is written

    def check_grid(self):
        """Refuse (ValueError) a grid that is not lists of ints (widths, bottlenecks and batch sizes
        >= 1, conv layers 0..4) and seeds an int >= 1."""
        def ints(values, lo, hi=INT64_MAX):
            return (isinstance(values, (list, tuple)) and values and
                    all(is_int(v, lo, hi) for v in values))
        for name in ("hidden", "bottleneck", "throughput_batches"):
            if not ints(getattr(self, name), 1):
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got "
                                 f"{getattr(self, name)!r}")
        if not ints(self.conv_layers, 0, 4):
            raise ValueError(f"conv_layers must be a non-empty list of ints in 0..4, got "
                             f"{self.conv_layers!r}")
        if not ints([self.seeds], 1):
            raise ValueError(f"seeds must be an int >= 1, got {self.seeds!r}")

    def recipe(self):
        """Everything that decides what the runs compute (the grid may change between invocations)."""
        return {k: v for k, v in asdict(self).items() if k not in self.PLACEMENT}

    def training(self, seed=0):
        return dict(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer,
                    lr=self.lr, weight_decay=self.weight_decay, schedule=self.schedule, seed=seed,
                    precision=self.precision)


@dataclass(frozen=True)
class Run:
    """One student training: a grid point (conv layers, bottleneck, width) x mode x seed."""

    conv_layers: int
    bottleneck: int
    hidden: int
    mode: str
    seed: int

    @property
    def point(self):
        return f"conv{self.conv_layers}-k{self.bottleneck}-h{self.hidden}"

    @property
    def name(self):
        return f"{self.point}/{self.mode}-seed{self.seed}"


def grid(cfg):
    """Every run of the grid, in a fixed order (labels and mimic of one seed next to each other)."""
    return [Run(c, k, h, mode, s) for c in cfg.conv_layers for k in cfg.bottleneck
            for h in cfg.hidden for s in range(cfg.seeds) for mode in MODES]


def shard(runs, spec):
    """The runs of shard "i/n" (every n-th run starting at i); None: all of them."""
    if spec is None:
        return list(runs)
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise ValueError(f"shard must be i/n with integers 0 <= i < n, e.g. 0/4, got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {spec!r}")
    return list(runs)[i::n]


# ----------------------------------------------------------------------------------------------
# the shared stage: data, teacher, transfer set, logit store (the pipeline's, in OUT)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    data: P.PipelineData
    logits: P.Logits
    info: dict  # data, transfer and teacher records of the report


_NUMBER = (int, float)
_COUNT = (int, 0, 2**63 - 1)  # an int in this range
_FRACTION = (_NUMBER, 0.0, 1.0)
_SECONDS = (_NUMBER, 0.0, 1e12)
# the keys each JSON file of a sweep must hold: a type, or (type, low, high) (a file consistent with
# its own sha256 may still have been written by hand: it is refused naming what is wrong, not with
# a KeyError or an overflow in the report)
_SCHEMAS = {
    "config": {"format": str, "config": dict, "recipe": dict, "command": str, "info": dict},
    "result": {"format": str, "run": dict, "point": str, "spec": dict, "params": _COUNT,
               "init_sha256": str, "test_accuracy": _FRACTION, "train_rows": _COUNT,
               "steps": _COUNT, "training": dict, "train_s": _SECONDS, "throughput": dict,
               "device": str, "final_loss": _NUMBER + (type(None),)},
    "teacher": {"test_accuracy": _FRACTION, "params": _COUNT, "throughput": dict, "device": str},
}
_RUN_FIELDS = {"conv_layers": _COUNT, "bottleneck": _COUNT, "hidden": _COUNT, "mode": str,
               "seed": _COUNT}


def _problems(obj, schema, prefix=""):
    out = []
    for key, rule in schema.items():
        ranged = isinstance(rule, tuple) and len(rule) == 3 and not isinstance(rule[1], type)
        kind, lo, hi = rule if ranged else (rule, None, None)
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            name = kind.__name__ if isinstance(kind, type) else "a number"
            out.append(f"{prefix}{key} must be {name}, got {type(value).__name__}")
        elif lo is not None and not lo <= value <= hi:
            shown = repr(value)
            shown = shown if len(shown) <= 24 else f"{shown[:12]}... ({len(shown)} digits)"
            out.append(f"{prefix}{key} must be in [{lo}, {hi:g}], got {shown}")
    return out


def _read_json(path, remedy, format=None, schema=None):
    """A JSON file the sweep wrote (files.read_json: verified against its sha256), of `format` when
    given, with the keys of `schema` (a _SCHEMAS name); a damaged, older, foreign or malformed one
    is refused naming it and what to do."""
    obj = read_json(path, remedy)
    if format is not None and obj.get("format") != format:
        raise ValueError(f"{path} is of format {obj.get('format')!r}, not {format!r} (another version "
                         f"of mimic_fast wrote it); {remedy}")
    problems = _problems(obj, _SCHEMAS.get(schema, {}))
    if schema in ("result", "teacher") and not problems:
        if schema == "result":
            problems = _problems(obj["run"], _RUN_FIELDS, "run.")
            if not problems and obj["run"]["mode"] not in MODES:
                problems = [f"run.mode must be one of {MODES}, got {obj['run']['mode']!r}"]
        if not problems and not all(isinstance(v, _NUMBER) and 0 <= v < 1e15
                                    for v in obj["throughput"].values()):
            problems = ["throughput must map batch sizes to samples/s"]
    if problems:
        raise ValueError(f"{path} is not a valid sweep file ({'; '.join(problems)}); {remedy}")
    return obj


def _given_teacher(cfg, data):
    """The --teacher files as one teacher (an ensemble of several), each checked against the data:
    a teacher made from another recipe may have trained on this sweep's test rows (another split)
    or on other labels (another fraction)."""
    teachers = P.load_teachers(cfg.teacher)
    checked = P.check_teacher_data(
        cfg.teacher, teachers.recipes, data,
        hint="sweep with the teacher's recipe (leave --split-seed and --label-fraction unset to "
             "inherit it)")
    checks = ["checked: the same dataset, split and labelled rows as the students" if ok else
              "unchecked: the teacher file records no data recipe" for ok in checked]
    return teachers.teacher, {"kind": "checkpoint", "paths": list(cfg.teacher), "data_check": checks,
                              "spec": teachers.spec, "members": len(teachers.members)}


def _trained_teacher(cfg, data, out, log):
    """The demo's teacher recipe, one resumable folder per member under out/teacher/."""
    teachers = P.train_teachers(
        data, cfg.teacher_members, epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch,
        lr=cfg.teacher_lr, weight_decay=cfg.weight_decay, channels=cfg.teacher_channels,
        hidden=cfg.teacher_hidden, dnn_hidden=cfg.teacher_dnn_hidden, dropout=cfg.teacher_dropout,
        out=os.path.join(out, "teacher"), hint=_STALE_HINT, device=cfg.device, log=log,
        precision=cfg.precision)
    n = len(teachers.members)
    first = teachers.spec["members"][0] if n > 1 else teachers.spec
    kind = "CNN" if first["name"] == "cnn" else "DNN"
    return teachers.teacher, {
        "kind": "trained", "recipe": f"the demo's: {kind} members on the labelled rows, SGD + cosine, "
                                     "logits averaged",
        "data_check": ["trained here on the students' labelled rows"] * n,
        "spec": teachers.spec, "members": n}


# a data file changed under the same path: everything made from the old one is stale
_STALE_HINT = ("the data changed since this sweep's files were made; use another --out, or delete "
               "the old folder to start over")


def _check_saved_data(out, wanted):
    """Refuse an OUT whose recorded data (sweep-config.json) is not this data: its teacher, transfer
    set and finished runs were made from other rows (e.g. the npz was rewritten in place)."""
    path = os.path.join(out, CONFIG_NAME)
    if os.path.isfile(path):
        saved = (_read_json(path, "use another --out", FORMAT, "config")["info"]).get("data")
        if saved is not None:
            check_recipe(saved, wanted, path, DATA_FIELDS, hint=_STALE_HINT)


def _prepare(cfg, data, out, log):
    """Labelled + unlabelled rows of the training split (+ the npz's X_unlabelled) + generated rows
    from the labelled ones make the transfer set; none may equal a test row (the test split is
    read only for that check and for the teacher's accuracy)."""
    splits = data.splits
    os.makedirs(out, exist_ok=True)
    # shards sharing OUT: the first one trains the teacher and fills the store, the others wait
    with writer_lock(out, "sweep folder", wait=True):
        wanted = data.recipe
        _check_saved_data(out, wanted)
        # refusals first: a teacher of other data, then test rows in the transfer set
        given = _given_teacher(cfg, data) if cfg.teacher else None
        transfer = P.transfer_set(
            os.path.join(out, P.TRANSFER_FILE), data, cfg.n_generated, cfg.method, "labelled",
            cfg.split_seed, remedy="delete it (and OUT/logits) to rebuild it, or use another --out")
        teacher, teacher_info = given or _trained_teacher(cfg, data, out, log)
        dev = default_device(cfg.device)
        teacher.to(dev)
        logits_dir = os.path.join(out, P.LOGITS_DIR)
        logits = P.collect(teacher, transfer, out, dtype=torch.float32, device=dev, wait=True,
                           remedy=f"use another --out, or delete {logits_dir} to collect the logits "
                                  "again")
        teacher_path = os.path.join(out, "teacher.json")
        # keyed by the rows it was measured on: a rewritten data file is measured again
        rows = {k: wanted[k] for k in ("train_rows", "test_rows")}
        measured = None
        if os.path.isfile(teacher_path):
            measured = _read_json(teacher_path, "delete it to measure the teacher again",
                                  schema="teacher")
            if measured.pop("data_rows", None) != rows:
                measured = None
        if measured is None:
            example = splits.test.tensors[0][0]
            prec = dict(precision=cfg.precision)
            measured = {"test_accuracy": T.evaluate(teacher, splits.test, device=dev, **prec),
                        "params": count_parameters(teacher),
                        "throughput": {str(b): T.throughput(teacher, example, b, cfg.throughput_time,
                                                            **prec)
                                       for b in cfg.throughput_batches},
                        "device": str(dev), **prec}
            if len(getattr(teacher, "members", [])) > 1:
                measured["member_accuracy"] = [T.evaluate(m, splits.test, device=dev, **prec)
                                               for m in teacher.members]
            write_json(teacher_path, {**measured, "data_rows": rows})
        teacher.cpu()
    n_extra = 0 if splits.unlabelled is None else len(splits.unlabelled)
    options = {"dataset": cfg.dataset, "data": cfg.data, "split_seed": cfg.split_seed,
               "label_fraction": cfg.label_fraction, "n_generated": cfg.n_generated,
               "method": cfg.method, "generate_from": "labelled", "seed": cfg.split_seed}
    info = {
        "data": {**wanted, "n_train": len(splits.train), "n_labelled": len(data.labelled),
                 "n_unlabelled_train": len(data.unlabelled), "n_unlabelled_extra": n_extra,
                 "n_test": len(splits.test), "meta": splits.meta},
        "transfer": {"rows": len(logits.transfer), "composition": logits.transfer.counts(),
                     **options, "test_rows": transfer.test_rows,
                     "note": "training split only: its labelled and unlabelled rows"
                             + (", the file's X_unlabelled" if n_extra else "")
                             + (f", {cfg.n_generated} {cfg.method} rows generated from the labelled "
                                "rows" if cfg.n_generated else "")},
        "teacher": {**teacher_info, **measured},
    }
    return _Prepared(data, logits, info)


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
def _student(run, cfg, splits):
    """The student of a grid point and its save_model spec (conv layers: 2-D on images, 1-D on
    (channels, length) or flat rows)."""
    D, C = splits.in_features, splits.num_classes
    if run.conv_layers == 0:
        kw = {"in_features": D, "num_classes": C, "hidden": run.hidden, "bottleneck": run.bottleneck}
        return WideShallowStudent(**kw), {"class": "WideShallowStudent", "kwargs": kw}
    name = f"conv-student-{run.conv_layers}"
    kw = {"input_shape": list(splits.input_shape), "num_classes": C, "channels": cfg.conv_channels,
          "bottleneck": run.bottleneck, "hidden": run.hidden}
    return build_model(name, **kw), {"name": name, "kwargs": kw}


def _run_folder(out, run):
    return os.path.join(out, "points", run.point, f"{run.mode}-seed{run.seed}")


def _train_run(run, cfg, prep, out):
    folder = _run_folder(out, run)
    torch.manual_seed(run.seed)  # the same initial weights for both modes of a seed
    splits = prep.data.splits
    model, spec = _student(run, cfg, splits)
    init = state_hash(model)
    common = dict(resume=os.path.isfile(os.path.join(folder, T.CHECKPOINT)), device=cfg.device,
                  progress=False, extra={"mode": run.mode}, **cfg.training(run.seed))
    rows = len(prep.logits.transfer)
    if run.mode == "labels":
        res = P.train_on_labels(prep.data, model, spec, folder, P.STUDENT_FILE, rows=rows, **common)
        kind = "teacher"
    else:
        res = P.distill_student(prep.data, model, spec, prep.logits, folder, test=False, loss="mse",
                                wait=True,
                                **common)
        kind = "distill"
    ckpt = load_checkpoint(os.path.join(folder, T.CHECKPOINT), kind)
    dev = default_device(cfg.device)
    example = splits.test.tensors[0][0]
    prec = dict(precision=cfg.precision)
    result = {
        "format": RESULT_FORMAT, "run": asdict(run), "point": run.point, "spec": spec,
        "params": count_parameters(res.model), "init_sha256": init,
        "test_accuracy": T.evaluate(res.model, splits.test, device=dev, **prec),
        "train_rows": rows, "steps": int(ckpt["step"]),
        "training": {k: ckpt["config"][k] for k in ("optimizer", "lr", "momentum", "weight_decay",
                                                    "schedule", "epochs", "batch_size", "seed",
                                                    "precision")},
        "final_loss": res.final.get("loss"),
        "train_s": sum(h["time"] for h in res.history),
        "throughput": {str(b): T.throughput(res.model, example, b, cfg.throughput_time, **prec)
                       for b in cfg.throughput_batches},
        "device": str(dev), **prec,
    }
    # result.json last: its presence marks the run done
    if run.mode == "mimic":
        result["inputs"] = prep.logits.inputs
    write_json(os.path.join(folder, "result.json"), result)
    return result


def _read_result(out, run):
    path = os.path.join(_run_folder(out, run), "result.json")
    if not os.path.isfile(path):
        return None
    return _read_json(path, "delete its folder to train that run again", RESULT_FORMAT, "result")


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------
def command_line(cfg):
    """The `mimic-fast sweep` command that reproduces this sweep (every recipe option spelled out)."""
    # what the options left unset resolve to for this data and teacher is not spelled out
    d, opt = SweepConfig(dataset=cfg.dataset, data=cfg.data, teacher=cfg.teacher).resolved(), []
    for f in fields(SweepConfig):
        value = getattr(cfg, f.name)
        default = getattr(SweepConfig if f.name in ("dataset", "data", "teacher") else d, f.name)
        if f.name in ("device", "threads") or value == default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "teacher":
            opt += [flag, *value]
        elif isinstance(value, tuple):
            opt += [flag, ",".join(map(str, value))]
        else:
            opt += [flag, str(value)]
    return " ".join(["mimic-fast", "sweep", *map(shlex.quote, opt)])


def _versions():
    return {"mimic_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _union(saved, cfg):
    """cfg with its grid widened to every point a sweep on this folder ran before (`saved`: the
    config recorded in sweep-config.json), so that the recorded command reproduces every point the
    report shows (one invocation's grid would not: its report gathers all the folder's runs)."""
    def merged(name):
        return tuple(dict.fromkeys([*map(int, saved.get(name) or ()), *getattr(cfg, name)]))

    return replace(cfg, hidden=merged("hidden"), bottleneck=merged("bottleneck"),
                   conv_layers=merged("conv_layers"),
                   seeds=max(cfg.seeds, int(saved.get("seeds") or 0)))


def _write_config(cfg, out, info):
    """Record the sweep's options, its grid (the union of every grid run on `out`) and the command
    that reproduces them, under the folder's lock (shards write it too); refuse a changed recipe."""
    path = os.path.join(out, CONFIG_NAME)
    with writer_lock(out, "sweep folder", wait=True):
        saved = _read_config(path)[0] if os.path.isfile(path) else None
        recipe = json.loads(json.dumps(cfg.recipe()))  # tuples as lists, as stored
        # sweeps made before precision was an option trained in float32
        saved_recipe = None if saved is None else {"precision": "fp32", **saved["recipe"]}
        if saved is not None and saved_recipe != recipe:
            diff = {k: (saved_recipe.get(k), v) for k, v in recipe.items()
                    if saved_recipe.get(k) != v}
            text = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a sweep made with other options (saved -> now): {text}; "
                             "use another --out (only the grid, seeds, device, threads and "
                             "--throughput-time may change)")
        if saved is not None:
            cfg = _union(saved["config"], cfg)
        if info is None:
            info = saved["info"]
        new = {"format": FORMAT, "config": asdict(cfg), "recipe": recipe,
               "command": command_line(cfg), "info": info}
        if saved is None or json.loads(json.dumps(new)) != saved:  # an unchanged file stays as is
            write_json(path, new)


def _check_fits(cfg, data):
    """Build the grid's largest student of each conv depth once (then drop it; the parameters grow
    with width and bottleneck): one that cannot be allocated is refused before anything is written,
    not after the teacher and the logits."""
    for c in cfg.conv_layers:
        r = Run(c, max(cfg.bottleneck), max(cfg.hidden), MODES[0], 0)
        P.build_checked(lambda: _student(r, cfg, data.splits), f"student {r.point}",
                        "choose smaller --hidden (or --bottleneck) values")


def run(config=None, out="runs/sweep", shard_spec=None, progress=True, log=print, invocation=None):
    """Train every run of this shard that is not done yet, then write out/sweep.json, sweep.png and
    sweep.md from all the runs that exist (see report). Returns the report dict."""
    cfg = (config or SweepConfig()).resolved()
    cfg.validate()
    runs = grid(cfg)
    mine = shard(runs, shard_spec)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        data = P.load_data(cfg.dataset, cfg.data, cfg.split_seed, cfg.label_fraction)
        _check_fits(cfg, data)
        # refuse a changed recipe before any work (the stored info is refreshed once prepared)
        if os.path.isfile(os.path.join(out, CONFIG_NAME)):
            _write_config(cfg, out, None)
        log(f"mimic-fast sweep: {cfg.dataset}, {len(runs)} runs ({len(runs) // (2 * cfg.seeds)} points"
            f" x {' / '.join(MODES)} x {cfg.seeds} seeds)"
            + (f", shard {shard_spec}: {len(mine)} runs" if shard_spec else "")
            + f"; torch {torch.__version__}, {torch.get_num_threads()} thread(s); out {out}")
        prep = _prepare(cfg, data, out, log)
        _write_config(cfg, out, prep.info)
        t = prep.info["teacher"]
        log(f"teacher: {t['params']:,} parameters, test accuracy {t['test_accuracy']:.4f}; transfer "
            f"set {prep.info['transfer']['rows']} rows {prep.info['transfer']['composition']}")
        _check_inputs(out, runs, prep.logits.inputs)
        todo = [r for r in mine if _read_result(out, r) is None]
        if len(todo) < len(mine):
            log(f"{len(mine) - len(todo)} run(s) already done in {out}/points: kept")
        say = (lambda line: tqdm.write(line, file=sys.stdout)) if progress else log
        bar = tqdm(todo, desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
        for r in bar:
            bar.set_postfix_str(r.name, refresh=True)
            # a run another process is training (a duplicated shard) is left to it
            try:
                with writer_lock(_run_folder(out, r), "sweep run folder"):
                    if _read_result(out, r) is not None:  # finished meanwhile by another process
                        continue
                    res = _train_run(r, cfg, prep, out)
            except LockedError:
                say(f"{r.name}: being trained by another process; skipped")
                continue
            say(f"{r.name}: {res['params']:,} params, test accuracy {res['test_accuracy']:.4f}, "
                f"{res['steps']} steps in {res['train_s']:.2f} s")
        bar.close()
    finally:
        torch.set_num_threads(threads_before)
    return report(out, log=log, invocation=invocation)


def _check_inputs(out, runs, inputs):
    """Refuse a sweep whose finished mimic runs trained on other logits or another transfer set than
    OUT holds now (collected again since): the report would mix students of two teachers."""
    for r in runs:
        res = _read_result(out, r) if r.mode == "mimic" else None
        if res is not None and res.get("inputs") != inputs:
            raise ValueError(f"{os.path.join(_run_folder(out, r), 'result.json')} was trained on "
                             f"{T.describe_inputs(res.get('inputs'))}, but {out} now holds "
                             f"{T.describe_inputs(inputs)}: its logits were collected again since, "
                             f"and the report would mix students of both; delete {out}/points to "
                             "train every run again, or use another --out")


def _summary(results, key):
    values = torch.tensor([r[key] for r in results], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def _check_pairs(results):
    """Labels and mimic runs of one point and seed must differ only in what they learn from."""
    by = {}
    for r in results:
        by.setdefault((r["point"], r["run"]["seed"]), {})[r["run"]["mode"]] = r
    for (point, seed), pair in sorted(by.items()):
        if len(pair) < 2:
            continue
        a, b = pair["labels"], pair["mimic"]
        for key in ("spec", "init_sha256", "steps", "training", "train_rows"):
            if a[key] != b[key]:
                raise ValueError(f"{point} seed {seed}: the labels and mimic runs differ in {key} "
                                 f"({a[key]!r} vs {b[key]!r}); the comparison would not be fair")


def report(out="runs/sweep", log=print, invocation=None):
    """Gather every finished run under out/points into out/sweep.json, sweep.png and sweep.md (under
    the folder's lock: shards finishing together write one report after the other)."""
    path = os.path.join(out, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sweep in {out}: {path} is missing (run `mimic-fast sweep --out "
                                f"{out}` first)")
    with writer_lock(out, "sweep folder", wait=True):
        return _report(out, path, log, invocation)


def _read_config(path):
    """(the saved sweep-config.json, its SweepConfig): refused, naming the file, when its config is
    not one a SweepConfig holds (a file consistent with its sha256 may have been written by hand)."""
    saved = _read_json(path, "use another --out", FORMAT, "config")
    try:
        cfg = SweepConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in saved["config"].items()})
        cfg.check_grid()
    except (TypeError, ValueError) as e:  # a key no SweepConfig has, a grid of other things
        raise ValueError(f"{path} is not a valid sweep file (config: {e}); use another --out") from None
    return saved, cfg


def _report(out, path, log, invocation):
    saved, cfg = _read_config(path)
    results = []
    points_dir = os.path.join(out, "points")
    for point in sorted(os.listdir(points_dir)) if os.path.isdir(points_dir) else []:
        if not os.path.isdir(os.path.join(points_dir, point)):
            continue
        for name in sorted(os.listdir(os.path.join(points_dir, point))):
            p = os.path.join(points_dir, point, name, "result.json")
            if os.path.isfile(p):
                results.append(_read_json(p, "delete its folder to train that run again",
                                          RESULT_FORMAT, "result"))
    _check_pairs(results)
    seen = {json.dumps(r.get("inputs"), sort_keys=True) for r in results if r["run"]["mode"] == "mimic"}
    if len(seen) > 1:
        raise ValueError(f"the mimic runs under {points_dir} trained on {len(seen)} different logit "
                         "stores or transfer sets (collected again between runs): their report "
                         f"would mix them; delete {points_dir} and run the sweep again")
    groups, arch = {}, {}
    for r in results:
        groups.setdefault((r["point"], r["run"]["mode"]), []).append(r)
        arch.setdefault(r["point"], []).append(r)
    # one architecture has one speed: the median over all its runs, both modes
    speed = {point: {b: sorted(r["throughput"][b] for r in rs)[len(rs) // 2]
                     for b in rs[0]["throughput"]} for point, rs in arch.items()}
    points = []
    for (point, mode), rs in groups.items():
        rs.sort(key=lambda r: r["run"]["seed"])
        run0 = rs[0]["run"]
        acc, acc_std = _summary(rs, "test_accuracy")
        points.append({
            "point": point, "mode": mode, "conv_layers": run0["conv_layers"],
            "bottleneck": run0["bottleneck"], "hidden": run0["hidden"], "params": rs[0]["params"],
            "seeds": [r["run"]["seed"] for r in rs], "accuracy": [r["test_accuracy"] for r in rs],
            "accuracy_mean": acc, "accuracy_std": acc_std, "final_loss": [r["final_loss"] for r in rs],
            "steps": rs[0]["steps"],
            "train_s_mean": _summary(rs, "train_s")[0],
            "throughput": speed[point],
            "device": rs[0]["device"]})
    points.sort(key=lambda p: (p["conv_layers"], p["bottleneck"], p["params"], MODES.index(p["mode"])))
    done = {(r["point"], r["run"]["mode"], r["run"]["seed"]) for r in results}
    missing = [r.name for r in grid(cfg) if (r.point, r.mode, r.seed) not in done]
    result = {
        "format": FORMAT, "command": saved["command"],
        "invocation": list(invocation) if invocation is not None else None,
        "versions": _versions(),
        # the accuracies reproduce where its REPRODUCE fields match (_env)
        "environment": _env.record(threads=cfg.threads or torch.get_num_threads()),
        "config": saved["config"], **saved["info"],
        "training": {**cfg.training(), "seeds": list(range(cfg.seeds)),
                     "steps": points[0]["steps"] if points else None,
                     "shared": "labels and mimic runs of a point and seed share architecture, initial "
                               "weights, optimiser, schedule, batch size and optimizer steps (checked)"},
        "points": points, "missing": missing,
    }
    result = write_json(os.path.join(out, "sweep.json"), result)
    atomic_write_text(os.path.join(out, "sweep.md"), sweep_report.markdown(result))
    sweep_report.plot(result, os.path.join(out, "sweep.png"))
    log("")
    log(sweep_report.markdown(result))
    log(f"wrote {os.path.join(out, 'sweep.json')}, sweep.md and sweep.png"
        + (f" ({len(missing)} run(s) of the recorded grid not trained yet: the other shards, or "
           "the recorded command, train them; then --report)" if missing else ""))
    return result


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _ints(text):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,512,4096, "
                                         f"got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_arguments(p):
    """The sweep's options; every SweepConfig field is one flag of the same name."""
    d = SweepConfig()

    def csv(values):
        return ",".join(map(str, values))

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="digits (bundled, default), cifar10 (--data: the folder of the python batches) "
                        "or npz (--data: a file with X, y and optional X_test, y_test, X_unlabelled)")
    g.add_argument("--data", default=None, help="path of the cifar10 folder or the .npz file")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/test split and of the labelled subset (default: the "
                        "--teacher's recorded one, else 0)")
    g.add_argument("--label-fraction", type=float, default=None,
                   help="stratified fraction of the training split that keeps its labels; the rest is "
                        "unlabelled transfer data (default: the --teacher's recorded one, else 0.15 "
                        "on digits, 1.0 otherwise)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", nargs="+", default=(),
                   help="teacher.pt file(s) of `mimic-fast train-teacher`; several are averaged as an "
                        "ensemble (default: --train-teacher)")
    g.add_argument("--train-teacher", action="store_true",
                   help="train the teacher here with the demo's recipe (an ensemble of "
                        f"{d.teacher_members} CNNs "
                        + "-".join([f"{c}c" for c in d.teacher_channels] + [str(h) for h in d.teacher_hidden])
                        + " or, for flat rows, DNNs " + "-".join(map(str, d.teacher_dnn_hidden))
                        + ", on the labelled rows, SGD + cosine); the default when no --teacher is given")
    g.add_argument("--teacher-members", type=int, default=d.teacher_members)
    g.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs)
    g.add_argument("--teacher-batch", type=int, default=d.teacher_batch)
    g.add_argument("--teacher-lr", type=float, default=d.teacher_lr)
    g.add_argument("--teacher-channels", type=_ints, default=d.teacher_channels,
                   help=f"CNN teacher (images): conv channels per stage (default {csv(d.teacher_channels)})")
    g.add_argument("--teacher-hidden", type=_ints, default=d.teacher_hidden,
                   help=f"CNN teacher: fully connected widths (default {csv(d.teacher_hidden)})")
    g.add_argument("--teacher-dnn-hidden", type=_ints, default=d.teacher_dnn_hidden,
                   help=f"DNN teacher (flat rows): widths (default {csv(d.teacher_dnn_hidden)})")
    g.add_argument("--teacher-dropout", type=float, default=d.teacher_dropout)
    g = p.add_argument_group("transfer set (training split only)")
    g.add_argument("--n-generated", type=int, default=d.n_generated,
                   help=f"rows generated from the labelled rows (default {d.n_generated})")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="generator of those rows (shift: images only)")
    g = p.add_argument_group("grid")
    g.add_argument("--hidden", type=_ints, default=d.hidden,
                   help=f"student widths H (default {csv(d.hidden)})")
    g.add_argument("--bottleneck", type=_ints, default=d.bottleneck,
                   help=f"bottleneck sizes k (default {csv(d.bottleneck)})")
    g.add_argument("--conv-layers", type=_ints, default=d.conv_layers,
                   help="conv layers (conv-ReLU-pool) before the wide layer, e.g. 0,1,2 (default 0)")
    g.add_argument("--conv-channels", type=int, default=d.conv_channels,
                   help=f"channels of each conv layer (default {d.conv_channels})")
    g.add_argument("--seeds", type=int, default=d.seeds,
                   help=f"seeds 0..N-1 per point and mode (default {d.seeds})")
    g = p.add_argument_group("student training (the same for labels and mimicry)")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"epochs over the transfer set's length (default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--optimizer", choices=T.OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", choices=T.SCHEDULES, default=d.schedule)
    g.add_argument("--precision", choices=T.PRECISIONS, default=d.precision,
                   help="bf16: the teacher trained here and every student are trained, evaluated "
                        "and timed under bfloat16 autocast over float32 weights (default fp32)")
    g = p.add_argument_group("running")
    g.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="run only every N-th run of the grid starting at I (0-based); shards share "
                        "--out; the last one to finish writes the complete report")
    g.add_argument("--report", action="store_true",
                   help="train nothing: gather the runs in --out into sweep.json, sweep.png, sweep.md "
                        "(only --out is read)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: the models are small; 0: torch's "
                        "choice)")
    g.add_argument("--throughput-batches", type=_ints, default=d.throughput_batches,
                   help=f"batch sizes of the inference timing (default {csv(d.throughput_batches)})")
    g.add_argument("--throughput-time", type=float, default=d.throughput_time,
                   help=f"seconds of inference timed per batch size (default {d.throughput_time})")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args):
    if args.teacher and args.train_teacher:
        raise ValueError("--teacher and --train-teacher exclude each other")
    values = {f.name: getattr(args, f.name) for f in fields(SweepConfig)}
    values["teacher"] = tuple(values["teacher"])
    return SweepConfig(**values)


def run_from_args(args):
    # the process's own command line; `python -m mimic_fast` runs __main__.py
    prog = sys.argv[0] if sys.argv else ""
    prog = "python -m mimic_fast" if prog.endswith("__main__.py") else os.path.basename(prog)
    invocation = [prog, *sys.argv[1:]]
    if args.report:
        report(args.out, invocation=invocation)
    else:
        run(config_from_args(args), args.out, args.shard, progress=args.progress,
            invocation=invocation)
    return 0


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="mimic-fast sweep", description=__doc__,
                                                   allow_abbrev=False))
    return run_from_args(parser.parse_args(argv))
