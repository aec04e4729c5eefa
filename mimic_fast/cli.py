"""The `mimic-fast` command (also `python -m mimic_fast`): demo, train-teacher, collect-logits,
import-logits, distill, export, sweep, bench, info.

The pipeline commands hand files to each other through --out folders (teacher.pt; transfer.pt +
logits/; student.pt) and run unchanged under `torchrun --nproc_per_node N -m mimic_fast ...`.
"""
import argparse
import contextlib
import errno
import os
import sys
import warnings

import numpy as np
import torch

from . import pipeline as P
from . import train as T
from ._io import writer_lock
from ._wording import cli_wording, one_line, out_of_memory
from .data import DATASETS, LogitStore
from .data.store import HEADER_NAME, cast_limit, overflow_remedy
from .data.transfer import METHODS
from .demo import add_arguments as demo_arguments
from .demo import config_from_args, run_demo
from .dispatch import format_info
from .distributed import default_device, dist_info, init_distributed, on_rank0
from .export import export_student, latency
from .files import write_json
from .models import build_model
from .sweep import add_arguments as sweep_arguments
from .sweep import run_from_args
from .teachers import load_module
from .train import DEFAULT_LR


# ----------------------------------------------------------------------------------------------
# shared options
# ----------------------------------------------------------------------------------------------
def _add_data(p, recorded=None):
    """recorded: the file whose data recipe --split-seed and --label-fraction default to (a later
    step of the pipeline must use the recipe of the files it reads; a different value is refused)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=DATASETS,
                   help="digits (bundled with scikit-learn), cifar10 (--data: the folder of the python "
                        "batches) or npz (--data: a file with X, y and optional X_test, y_test, "
                        "X_unlabelled)")
    g.add_argument("--data", default=None, help="path of the cifar10 folder or the .npz file")
    also = f" (default: the value recorded in {recorded}; another value is refused)" if recorded else ""
    g.add_argument("--split-seed", type=int, default=None if recorded else 0,
                   help="seed of the train/test split (digits, npz without X_test) and of the "
                        "labelled subset" + (also or " (default 0)"))
    g.add_argument("--label-fraction", type=float, default=None if recorded else 1.0,
                   help="keep labels on this stratified fraction of the training split; the rest "
                        "is unlabelled transfer data" + (also or " (default 1.0)"))


def _add_training(p, epochs, kind, batch_size):
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs,
                   help=f"passes over the training rows (default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"global batch, split evenly over torchrun ranks (default {batch_size})")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="SGD with Nesterov momentum, or Adam (default sgd)")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR[kind]})")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD's Nesterov momentum, in [0, 1) (default 0.9; Adam ignores it)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    g.add_argument("--schedule", choices=("cosine", "step", "none"), default="cosine",
                   help="per-batch learning-rate schedule (default cosine)")
    g.add_argument("--step-epochs", type=int, default=0,
                   help="step schedule: multiply the lr by --gamma every this many epochs "
                        "(0: every third of the run)")
    g.add_argument("--gamma", type=float, default=0.1,
                   help="step schedule: the lr's factor every --step-epochs, in (0, 1] (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="initialisation, sampling and dropout seed")
    g.add_argument("--precision", choices=T.PRECISIONS, default="fp32",
                   help="bf16: mixed precision (float32 weights and optimizer state, forward, loss "
                        "and evaluation under bfloat16 autocast); default fp32")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint.pt is in --out (without it an existing "
                        "checkpoint is never overwritten)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _training_options(args):
    return dict(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                step_epochs=args.step_epochs, gamma=args.gamma, grad_clip=args.grad_clip,
                seed=args.seed, num_workers=args.num_workers, precision=args.precision)


def _parse_ints(text, name):
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers like 512,512, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def _load_data(args):
    if args.dataset in ("cifar10", "npz") and args.data is None:
        raise ValueError(f"--dataset {args.dataset} needs --data PATH")
    if not 0 < args.label_fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    return P.load_data(args.dataset, args.data, args.split_seed, args.label_fraction)


def _inherit_recipe(args, recorded, source):
    """Fill --split-seed / --label-fraction left unset from the recipe recorded in `source`."""
    for name, default in (("split_seed", 0), ("label_fraction", 1.0)):
        if getattr(args, name) is None:
            value = (recorded or {}).get(name)
            setattr(args, name, default if value is None else value)
            if recorded and value is not None:
                _say(f"--{name.replace('_', '-')} {value} (recorded in {source})")


def _hold(lock):
    """A folder lock (mimic_fast._io) taken by rank 0 (errors raised on every rank)."""
    stack = contextlib.ExitStack()
    on_rank0(lambda: stack.enter_context(lock))
    return stack


def _lock_folder(folder, what):
    """The writer lock of an output folder, taken by rank 0."""
    return _hold(writer_lock(folder, what))


def _add_wait(p, what):
    p.add_argument("--wait", action="store_true",
                   help=f"wait while another process {what} (default: refuse, naming its pid)")


def _is_rank0():
    return dist_info()[0] == 0


def _say(*a):
    if _is_rank0():
        print(*a, flush=True)


def _warn(command):
    """One line `mimic-fast <command>: warning: ...` on stderr (rank 0)."""
    def warn(text):
        if _is_rank0():
            print(f"mimic-fast {command}: warning: {' '.join(str(text).split())}", file=sys.stderr)
    return warn


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def cmd_info(args):
    print(format_info())
    return 0


def cmd_demo(args):
    run_demo(args.out, config_from_args(args), progress=args.progress)
    return 0


def _build(name, splits, overrides):
    kwargs = dict(input_shape=tuple(splits.input_shape), num_classes=splits.num_classes, **overrides)
    options = ", ".join(f"--{k} {v}" for k, v in overrides.items()) or "its defaults"
    try:
        model = P.build_checked(lambda: build_model(name, **kwargs), f"model {name} with {options}")
    except TypeError as e:  # an option this architecture does not have (e.g. a DNN's bottleneck)
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"model {name} does not take one of the options {options} ({e}); leave it "
                         "out or choose a model that has it") from None
    return model, {"name": name, "kwargs": kwargs}


def cmd_train_teacher(args):
    init_distributed()
    # options and --device first: refused before anything is read or written
    T.check_options("teacher", **_training_options(args))
    default_device(args.device)
    data = _load_data(args)
    overrides = {}
    if args.hidden:
        overrides["hidden"] = _parse_ints(args.hidden, "--hidden")
    if args.channels:
        overrides["channels"] = _parse_ints(args.channels, "--channels")
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    n = data.labelled_test_rows()
    if n:  # the data's own X may repeat rows of its X_test: the teacher then trains on test rows
        _warn("train-teacher")(f"{n} labelled training rows equal test rows (the data's X repeats "
                               "rows of X_test): the teacher's test accuracy is not a held-out "
                               "result; deduplicate the data")
    torch.manual_seed(args.seed)
    model, spec = _build(args.model, data.splits, overrides)
    _say(f"teacher {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"{len(data.labelled)} labelled rows of {len(data.splits.train)}")
    with _lock_folder(args.out, "train-teacher output folder"):  # the run and teacher.pt
        res = P.train_on_labels(data, model, spec, args.out, resume=args.resume, test=True,
                                device=args.device, progress=args.progress, **_training_options(args))
        _say(f"test accuracy {res.final.get('test_accuracy', float('nan')):.4f} ({args.precision}); "
             f"wrote {os.path.join(args.out, P.TEACHER_FILE)}")
    return 0


def cmd_collect_logits(args):
    init_distributed()
    # the device and the teachers first: a bad --device or --teacher fails before anything is written
    device = default_device(args.device)
    teachers = P.load_teachers(args.teacher, args.teacher_output)
    _inherit_recipe(args, teachers.recipes[0], args.teacher[0])
    data = _load_data(args)

    def unchecked(path):
        _warn(args.command)(f"{path} records no data recipe: it cannot be checked to have never "
                            "seen the test rows")

    # every member of an ensemble, not the first only
    P.check_teacher_data(args.teacher, teachers.recipes, data, unchecked=unchecked,
                         hint="collect with the teacher's recipe (leave --split-seed and "
                              "--label-fraction unset to inherit it) or train a teacher on this one")
    P.probe_teacher(teachers.teacher, " + ".join(args.teacher), data)
    P.refuse_folder_links(args.out, "teacher.json")
    # a rebuilt transfer.pt and its logits are written under one hold of the store's writer lock,
    # refused (before anything is written) while a student trains on them
    with _lock_folder(args.out, "collect-logits output folder"), contextlib.ExitStack() as held:
        transfer = P.transfer_set(
            os.path.join(args.out, P.TRANSFER_FILE), data, args.n_generated, args.method,
            args.generate_from, args.seed, args.noise_std, overwrite=args.overwrite,
            allow_test_rows=args.allow_test_rows, allow_option="--allow-test-rows",
            remedy="use another --out, the options it was made with, or --overwrite to rebuild it "
                   "and its logits (nothing is overwritten without it)",
            log=_say, warn=_warn(args.command), wait=args.wait, hold=held)
        teacher = teachers.teacher.to(device)
        logits = P.collect(teacher, transfer, args.out, dtype=_DTYPES[args.dtype],
                           batch_size=args.batch_size, device=device,
                           progress=args.progress and _is_rank0(), overwrite=args.overwrite,
                           teacher_id=teachers.teacher_id, wait=args.wait,
                           remedy="use another --out, or rerun with --overwrite to replace it",
                           teacher_name=f"--teacher {' '.join(args.teacher)}")
        acc = T.evaluate(teacher, data.splits.test, device=device)  # every rank: it is sharded
        if _is_rank0():
            write_json(os.path.join(args.out, "teacher.json"),
                       {"teachers": args.teacher, "spec": teachers.spec, "test_accuracy": acc})
            _say(f"teacher test accuracy {acc:.4f}; logits of {len(logits.transfer)} rows in "
                 f"{logits.store.path}")
    return 0


_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _read_logits(path):
    """The (N, C) float array of an .npy file (memory-mapped), refused in one line naming the file
    when it is not one: empty, truncated, an .npz archive, pickled objects, an integer or
    extended-precision array."""
    try:
        logits = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the OS's refusal (missing, permissions), naming the file
        raise ValueError(f"--logits {path} is not a readable .npy file ({type(e).__name__}: {e}): "
                         "write the (N, C) array with numpy.save") from None
    if isinstance(logits, np.lib.npyio.NpzFile):
        names = sorted(logits.files)
        logits.close()
        raise ValueError(f"--logits {path} is an .npz archive (arrays {names}), not an .npy file: "
                         "pass one (N, C) array written with numpy.save")
    if logits.dtype.kind != "f" or logits.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"--logits {path} holds {logits.dtype}: expected float16, float32 or float64 "
                         "logits (convert with .astype(numpy.float64))")
    return logits


def _check_imported(args, logits, n, classes, values=True):
    """Refuse logits of another shape than the transfer set's (n, classes), or (values) holding
    NaN/Inf or values beyond the storage dtype."""
    if logits.ndim != 2 or len(logits) != n or logits.shape[1] != classes:
        raise ValueError(f"--logits {args.logits} has shape {logits.shape} but the transfer set of "
                         f"--dataset {args.dataset} needs ({n}, {classes}): row i must be the "
                         "teacher's logits for row i (the training split in load order, labelled "
                         "rows first when --label-fraction < 1, then X_unlabelled)")
    if not values:
        return
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
        raise ValueError(f"--logits {args.logits}: row {int(bad[0])} holds NaN or Inf "
                         f"({len(bad)} such rows): a teacher's logits must be finite")
    top = float(np.abs(logits).max()) if logits.size else 0.0
    limit = cast_limit(args.dtype)
    if top >= limit:
        row = int(np.flatnonzero((np.abs(logits) >= limit).any(axis=1))[0])
        raise ValueError(f"--logits {args.logits}: row {row} holds |logit| {top:.3g}, more than "
                         f"{args.dtype} can store ({float(np.finfo(args.dtype).max):.5g}); "
                         f"{overflow_remedy(_DTYPES[args.dtype])}")


def cmd_import_logits(args):
    data = _load_data(args)
    logits = _read_logits(args.logits)
    store_path = os.path.join(args.out, P.LOGITS_DIR)
    header = os.path.join(store_path, HEADER_NAME)
    if os.path.exists(header) and not args.overwrite:
        try:
            existing = LogitStore.open(store_path, allow_partial=True, verify=False)
            state = ("complete" if existing.complete else
                     f"incomplete ({existing.committed_rows} of {existing.n} rows: an import or "
                     "collection that stopped)")
        except (ValueError, OSError):  # a damaged header, or its rows' files missing
            state = "damaged"
        raise FileExistsError(f"a logit store exists at {store_path} ({state}); rerun with "
                              "--overwrite to replace it, or use another --out")
    # checked before anything is written (a rejected import leaves nothing): the transfer set of
    # an import is the training split, then X_unlabelled (no generated rows)
    extra = data.splits.unlabelled
    _check_imported(args, logits, len(data.splits.train) + (0 if extra is None else len(extra)),
                    data.splits.num_classes)

    def fits(transfer):  # the transfer set actually used (built or reused) has that many rows
        _check_imported(args, logits, len(transfer), data.splits.num_classes, values=False)

    P.refuse_folder_links(args.out)
    # transfer.pt and the store under one hold of the store's writer lock (see collect-logits)
    with _lock_folder(args.out, "import-logits output folder"), contextlib.ExitStack() as held:
        transfer = P.transfer_set(
            os.path.join(args.out, P.TRANSFER_FILE), data, overwrite=args.overwrite,
            allow_test_rows=args.allow_test_rows, allow_option="--allow-test-rows", check=fits,
            remedy="use another --out, the options it was made with, or --overwrite to rebuild it "
                   "and its logits (nothing is overwritten without it)",
            log=_say, warn=_warn(args.command), wait=args.wait, hold=held)
        store = LogitStore.from_array(store_path, logits, transfer.transfer,
                                      dtype=_DTYPES[args.dtype], overwrite=args.overwrite,
                                      source=os.path.basename(args.logits), wait=args.wait)
    _say(f"imported {store.n} rows of {store.num_classes} logits into {store.path} (verified)")
    return 0


def _check_export_target(out, model_path, overwrite):
    """Refuse an --out that is --model itself (always) or any existing file (unless --overwrite),
    before anything is written."""
    if os.path.lexists(out):
        same = os.path.exists(model_path) and os.path.exists(out) and os.path.samefile(out, model_path)
        if same or os.path.realpath(out) == os.path.realpath(model_path):
            raise ValueError(f"--out {out} is the --model file itself: exporting over it would "
                             "destroy the model; choose another --out")
        if not overwrite:
            raise FileExistsError(f"--out {out} exists: pass --overwrite to replace it (atomically: "
                                  "a failed or killed export leaves it intact), or choose another "
                                  "--out")


def cmd_export(args):
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: time 1 thread and torch's default), got "
                         f"{args.threads}")
    model, kind = load_module(args.model, what="--model")
    _check_export_target(args.out, args.model, args.overwrite)
    if not isinstance(model, torch.nn.Module):  # a factory may return a plain function
        raise ValueError(f"--model {args.model}: the {kind} gave a {type(model).__name__}, not an "
                         "nn.Module: export needs a module (its layers are what is written)")
    shape = _parse_ints(args.input_shape, "--input-shape") if args.input_shape else None
    export_student(model, args.out, args.format, input_shape=shape)
    _say(f"wrote {args.out} ({args.format}, plain ops, dynamic batch; checked against the model)")
    if args.latency:
        # a small model is fastest on one thread (more only adds synchronisation); 0 times both
        default = torch.get_num_threads()
        counts = [args.threads] if args.threads else list(dict.fromkeys([1, default]))
        _say("median CPU latency per batch (torch and onnxruntime on the same thread count):")
        for threads in counts:
            torch.set_num_threads(threads)
            try:
                rows = latency(model, args.out, args.format, input_shape=shape)
            finally:
                torch.set_num_threads(default)
            for row in rows:
                _say(f"  {threads} thread{'s' if threads > 1 else ' '}  batch {row['batch']:>4}: fused "
                     f"{row['fused_s'] * 1e3:8.3f} ms   exported {row['exported_s'] * 1e3:8.3f} ms")
    return 0


def cmd_distill(args):
    init_distributed()
    # options and --device first: refused before anything is read or written
    T.check_options("distill", loss=args.loss, alpha=args.alpha, temperature=args.temperature,
                    **_training_options(args))
    default_device(args.device)
    # the folder's transfer set and logits stay as read until student.pt is written
    with _hold(P.logits_lock(args.logits, wait=args.wait)):
        return _distill(args)


def _distill(args):
    transfer, payload = P.read_transfer(args.logits)
    _inherit_recipe(args, payload.get("recipe") or {},
                    os.path.join(args.logits, P.TRANSFER_FILE))
    data = _load_data(args)
    logits = P.open_logits(args.logits, data, transfer, payload, verify=args.verify,
                           check_inputs=args.check_inputs)
    overrides = {}
    if args.hidden is not None:
        overrides["hidden"] = args.hidden
    if args.bottleneck is not None:
        overrides["bottleneck"] = args.bottleneck
    if args.activation is not None:
        overrides["activation"] = args.activation
    torch.manual_seed(args.seed)
    student, spec = _build(args.student, data.splits, overrides)
    if args.loss == "mse":
        P.check_logit_scale(logits, args.batch_size)  # before anything is written
    _say(f"student {args.student}: {sum(p.numel() for p in student.parameters()):,} parameters; "
         f"transfer set {transfer}")
    with _lock_folder(args.out, "distill output folder"):  # the run and student.pt
        res = P.distill_student(data, student, spec, logits, args.out, loss=args.loss,
                                alpha=args.alpha, temperature=args.temperature,
                                check_inputs=args.check_inputs, resume=args.resume,
                                device=args.device, progress=args.progress, wait=args.wait,
                                **_training_options(args))
        _say(f"test accuracy {res.final.get('test_accuracy', float('nan')):.4f} ({args.precision}); "
             f"wrote {os.path.join(args.out, P.STUDENT_FILE)}")
    return 0


def cmd_sweep(args):
    return run_from_args(args)


def cmd_bench(argv):
    try:  # optional: the benchmark harness may be left out of an installation
        from .bench import main as bench_main
    except ImportError as e:
        print(f"mimic-fast bench: the benchmark package mimic_fast.bench could not be imported ({e})",
              file=sys.stderr)
        return 2
    return bench_main(argv) or 0


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        prog="mimic-fast", allow_abbrev=False,
        description="Mimic learning (Ba & Caruana 2014) with fused wide-shallow students.",
        epilog="Distributed: torchrun --nproc_per_node N -m mimic_fast distill ... (also "
               "train-teacher, collect-logits); only rank 0 writes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", allow_abbrev=False,
                       help="the paper's effect on digits in a few CPU minutes (the README's "
                            "main command)",
                       description="Low-label digits: deep teacher, shallow student on labels, the same "
                                   "student by mimicry; prints a table, writes demo.json and demo.png.")
    demo_arguments(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train-teacher", allow_abbrev=False,
                       help="train a deep teacher on the labelled rows",
                       description="Train a teacher (cross-entropy) and write --out/teacher.pt, "
                                   "checkpoint.pt (each epoch) and metrics.jsonl.")
    _add_data(t)
    t.add_argument("--model", default="cnn", help="a models.build_model name: cnn (default), dnn-2k, "
                                                  "snn-8k, ...")
    t.add_argument("--hidden", default=None, help="fully connected widths, e.g. 512,512")
    t.add_argument("--channels", default=None, help="cnn: conv channels per stage, e.g. 32,64")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--out", required=True, help="output folder")
    _add_training(t, epochs=30, kind="teacher", batch_size=128)
    t.set_defaults(func=cmd_train_teacher)

    c = sub.add_parser("collect-logits", allow_abbrev=False,
                       help="build the transfer set and store the teacher's logits",
                       description="Transfer set = labelled rows + unlabelled rows (+ generated rows); "
                                   "writes --out/transfer.pt and the crash-safe, resumable logit store "
                                   "--out/logits (rerun the same command to resume).")
    _add_data(c, recorded="the (first) --teacher file")
    c.add_argument("--teacher", required=True, nargs="+",
                   help="teacher(s), averaged when several: a mimic_fast teacher.pt, a TorchScript "
                        "file, a torch.export .pt2, a torch.save(module) file (loading it runs "
                        "pickle: trusted files only), or package.module:factory (a callable taking "
                        "no arguments and returning a module or a function; the current folder is "
                        "appended to the import path, so a package here is found)")
    c.add_argument("--teacher-output", default=None,
                   help="where the logits are in the teacher's output: a dict key or attribute "
                        "(logits), a tuple index (0), or a dotted path (0.logits)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--n-generated", type=int, default=0, help="generated rows to add (default 0)")
    c.add_argument("--method", choices=METHODS, default="munge",
                   help="generator of the extra rows (shift: images only)")
    c.add_argument("--generate-from", choices=("labelled", "all"), default="labelled",
                   help="rows the generator starts from")
    c.add_argument("--noise-std", type=float, default=P.NOISE_STD, help="--method noise: the std")
    c.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage dtype of the logits")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--seed", type=int, default=0, help="seed of the generated rows")
    c.add_argument("--device", default=None)
    c.add_argument("--no-progress", dest="progress", action="store_false")
    c.add_argument("--overwrite", action="store_true",
                   help="rebuild transfer.pt and the logit store in --out even if they exist (without "
                        "it a store made with other options or data, or a damaged one, is refused)")
    c.add_argument("--allow-test-rows", action="store_true",
                   help="keep transfer rows that equal test rows (refused by default: students would "
                        "then be scored on rows they were trained on); recorded in transfer.pt")
    _add_wait(c, "trains on --out's logits or writes them")
    c.set_defaults(func=cmd_collect_logits)

    m = sub.add_parser("import-logits", allow_abbrev=False,
                       help="store logits computed elsewhere for distill",
                       description="Write --out/transfer.pt (the rows of --dataset) and a verified "
                                   "logit store --out/logits from an (N, C) .npy file whose row i "
                                   "holds the teacher's logits for transfer row i.")
    _add_data(m)
    m.add_argument("--logits", required=True, help="the (N, C) .npy file of teacher logits")
    m.add_argument("--out", required=True, help="output folder (then: distill --logits OUT)")
    m.add_argument("--dtype", choices=("float16", "float32"), default="float32",
                   help="storage dtype of the logits")
    m.add_argument("--overwrite", action="store_true",
                   help="replace transfer.pt and the store already in --out")
    m.add_argument("--allow-test-rows", action="store_true",
                   help="keep transfer rows that equal test rows (refused by default)")
    _add_wait(m, "trains on --out's logits or writes them")
    m.set_defaults(func=cmd_import_logits)

    e = sub.add_parser("export", allow_abbrev=False,
                       help="write a trained student as plain ONNX / torch.export ops",
                       description="Unfuse the model's fused layers (on a copy) and write it with a "
                                   "dynamic batch as ONNX (needs mimic_fast[export]) or a "
                                   "torch.export .pt2; the file is checked against the model.")
    e.add_argument("--model", required=True,
                   help="student.pt (or any file --teacher accepts; a torch.save(module) file runs "
                        "pickle: trusted files only)")
    e.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    e.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (atomically; never the --model file itself)")
    e.add_argument("--input-shape", default=None,
                   help="one row's shape, e.g. 64 or 3,32,32 (default: from the model)")
    e.add_argument("--latency", action="store_true",
                   help="also print batch-1 and batch-256 CPU latency, fused vs exported, each row "
                        "naming its thread count")
    e.add_argument("--threads", type=int, default=0,
                   help="CPU threads of the --latency runs, torch's and onnxruntime's alike (default "
                        "0: time both 1 thread, usually the fastest for a student this small, and "
                        "torch's default)")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("distill", allow_abbrev=False,
                       help="train a student on the stored logits",
                       description="Train a student by logit regression (mse) or KD on the logits in "
                                   "--logits, optionally mixed with hard labels: loss = (1 - alpha) * "
                                   "soft + alpha * CE on labelled rows. Writes --out/student.pt, "
                                   "checkpoint.pt and metrics.jsonl.")
    _add_data(s, recorded="--logits/transfer.pt")
    s.add_argument("--logits", required=True, help="the --out folder of collect-logits")
    s.add_argument("--student", default="snn-mimic-8k",
                   help="a models.build_model name: snn-mimic-8k (default), snn-mimic-400k, snn-8k, "
                        "conv-student-1..4, ...")
    s.add_argument("--hidden", type=int, default=None, help="student width H (override)")
    s.add_argument("--bottleneck", type=int, default=None, help="student bottleneck k (override)")
    s.add_argument("--activation", default=None, help="relu, sigmoid, tanh or gelu (override)")
    s.add_argument("--loss", choices=("mse", "kd"), default="mse",
                   help="mse: logit regression (fused for wide students); kd: Hinton KD")
    s.add_argument("--alpha", type=float, default=0.0, help="weight of the hard-label loss")
    s.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--check-inputs", choices=("all", "sample"), default="all",
                   help="hash every transfer row and compare it with the store's digest (all, "
                        "default: one pass over the inputs) or ~1000 of them (sample: huge stores)")
    s.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the store's checksum pass (huge stores; damage then goes unnoticed)")
    _add_wait(s, "writes the --logits store")
    _add_training(s, epochs=20, kind="distill", batch_size=256)
    s.set_defaults(func=cmd_distill)

    w = sub.add_parser("sweep", allow_abbrev=False,
                       help="the compression curve: students of every size on labels and by "
                            "mimicry, against the teacher",
                       description="Train a grid of students (--hidden, --bottleneck, --conv-layers) "
                                   "on labels and by mimicry of one teacher's stored logits; writes "
                                   "sweep.json, sweep.png and sweep.md (resumable, --shard i/n).")
    sweep_arguments(w)
    w.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", allow_abbrev=False,
                       help="benchmarks (see `mimic-fast bench --help`)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)

    i = sub.add_parser("info", allow_abbrev=False,
                       help="backends available here, versions, and why any is missing",
                       description="Print mimic_fast.info() as a table.")
    i.set_defaults(func=cmd_info)
    return p


ENV_INTS = ("MIMIC_FAST_CPU_CHUNK_H", "MIMIC_FAST_CUDA_CHUNK_H")  # positive ints when set


def _check_environment():
    for name in ENV_INTS:
        value = os.environ.get(name, "")
        if value.strip() and not (value.strip().isdigit() and int(value) > 0):
            raise ValueError(f"environment variable {name}={value!r} must be a positive integer (a "
                             f"chunk width); unset it to let mimic_fast choose")


def _os_error_line(e):
    """One line for an OSError: the file, what the OS said, and what to do."""
    if e.filename is None or e.strerror is None:  # our own messages (FileExistsError, LockedError...)
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")

    hint = {errno.EACCES: "check the permissions of the file and its folder",
            errno.EPERM: "check the permissions of the file and its folder",
            errno.EROFS: "the file system is read-only: choose an output folder on a writable one",
            errno.ENOSPC: "the disk is full: free space or choose another output folder",
            errno.ENOENT: "check the path; relative paths start from the current folder",
            errno.EISDIR: "a folder is in the way: pass a file path"}.get(e.errno, "")
    return f"{where}: {e.strerror}" + (f" ({hint})" if hint else "")


def _error(command, e):
    text = _os_error_line(e) if isinstance(e, OSError) else str(e)
    print(f"mimic-fast {command}: error: {' '.join(text.split())}", file=sys.stderr)
    return 2


# what a command turns into one error line (anything else is a bug and keeps its traceback)
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _run(command, call):
    """call() with its expected failures as one error line, exit 2: bad input and damaged files
    (ValueError), the OS's refusals (OSError: missing files, permissions, a full disk), divergence
    (FloatingPointError) and running out of memory. A failure of any other kind is a bug of ours and
    keeps its traceback."""
    try:
        with cli_wording(), warnings.catch_warnings():
            # the library's warnings (a pickled teacher, a resume with changed options) as one
            # line each, like the errors; the filters stay Python's
            warnings.showwarning = lambda message, *a, **k: _warn(command)(message)
            return call()
    except USER_ERRORS as e:
        return _error(command, e)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        return _error(command, ValueError(
            f"out of memory: {one_line(e)}; use a smaller model (--hidden, --bottleneck), a "
            "smaller --batch-size, or a machine with more memory"))


def _interrupted(args):
    out = getattr(args, "out", None)
    hint = ""
    if args.command in ("train-teacher", "distill"):
        checkpoint = os.path.join(out, T.CHECKPOINT) if out else None
        hint = (f"; completed epochs are kept in {checkpoint}: rerun with --resume"
                if checkpoint and os.path.isfile(checkpoint) else
                "; no epoch had finished, so there is nothing to resume: rerun the command")
    elif args.command in ("collect-logits", "sweep"):
        hint = "; rerun the same command to resume"
    print(f"mimic-fast {args.command}: interrupted{hint}", file=sys.stderr)
    return 130


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command == "bench":  # everything after `bench` (--help too) belongs to the bench parser
        return _run("bench", lambda: (_check_environment(), cmd_bench(argv[1:]))[1])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, under its own usage
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(args.command, lambda: (_check_environment(), args.func(args))[1])
    except KeyboardInterrupt:
        return _interrupted(args)
