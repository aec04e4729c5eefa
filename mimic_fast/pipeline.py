"""The mimic pipeline, one implementation: data -> teacher -> transfer set -> logits -> student.

Each stage is one function here; `mimic-fast` runs one stage per command (train-teacher,
collect-logits, import-logits, distill), `mimic-fast sweep` and `mimic-fast demo` run them all. A
stage that writes does so into a folder in the pipeline's layout, so any stage reads what any other
wrote, whoever ran it:

    teacher.pt      a model file (files.save_model) with the data recipe it was trained on
    transfer.pt     the transfer set (files.save_transfer): its rows and its recipe
    logits/         the teacher's logits over the transfer set (the logit store)
    student.pt      a model file with the data recipe and the transfer set's recipe

Rows travel flat (N, D): every models.build_model net unflattens them to input_shape itself, while a
WideShallowStudent takes only flat rows. Test rows never reach a transfer set unless the caller
allows them. Under torch.distributed every rank calls the same stages; rank 0 writes.

A folder's transfer.pt and logits/ are one unit under the store's lock (logits_lock): a student
trains while holding it shared, and transfer.pt is only written while holding it alone, so neither
changes under a training run. A student records the identities of the store and transfer set it
trained on (student.pt and its checkpoint: a resume on others is refused). Files inside a pipeline
folder are never symbolic links (refuse_folder_links).
"""
import contextlib
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from . import train as T
from ._io import reader_lock, refuse_links, writer_lock
from ._wording import one_line, out_of_memory
from .data import (DataSplits, LogitDataset, LogitStore, TransferSet, build_transfer_set,
                   collect_logits, data_recipe, input_digests, labelled_split, load_dataset)
from .data.collect import REUSE_REMEDY, param_dtype
from .data.identity import teacher_fingerprint
from .data.recipe import DATA_FIELDS, check_recipe
from .data.store import STORE_FILES
from .distributed import dist_info, on_rank0
from .files import load_model, load_transfer, save_model, save_transfer, transfer_digest
from .models import CNN, DNN, TeacherEnsemble
from .teachers import load_teacher

__all__ = ["PipelineData", "load_data", "build_checked", "train_on_labels", "Teachers", "teacher_member", "train_teachers", "load_teachers",
           "check_teacher_data", "probe_teacher", "NOISE_STD", "transfer_recipe", "build_transfer",
           "Transfer", "transfer_set", "collect", "read_transfer", "Logits", "open_logits",
           "check_logit_scale", "distill_student", "logits_lock", "refuse_folder_links",
           "TEACHER_FILE", "TRANSFER_FILE", "LOGITS_DIR", "STUDENT_FILE"]

TEACHER_FILE = "teacher.pt"
TRANSFER_FILE = "transfer.pt"
LOGITS_DIR = "logits"
STUDENT_FILE = "student.pt"


def _is_rank0():
    return dist_info()[0] == 0


def _quiet(*a):
    pass


def logits_lock(folder, write=False, wait=False):
    """The lock of a pipeline folder's transfer set and logits (the store's, folder/logits):
    readers share it, a writer of either file holds it alone (mimic_fast._io)."""
    lock = writer_lock if write else reader_lock
    return lock(os.path.join(folder, LOGITS_DIR), "logit store", wait=wait)


def refuse_folder_links(folder, *names):
    """Refuse (OSError naming it) a symbolic link among the files a collection writes in `folder`
    (transfer.pt, logits/ and the store's files, and `names`), before anything is written there."""
    refuse_links(folder, (TRANSFER_FILE, LOGITS_DIR, *names))
    refuse_links(os.path.join(folder, LOGITS_DIR), STORE_FILES)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass
class PipelineData:
    """A data set split for the pipeline: `splits` (rows flat), the labelled and unlabelled row
    indices of its training split, and how it was made (the data recipe's inputs)."""

    splits: DataSplits
    labelled: torch.Tensor
    unlabelled: torch.Tensor
    dataset: str
    data: str = None
    split_seed: int = 0
    label_fraction: float = 1.0

    @cached_property
    def recipe(self):
        """data.recipe.data_recipe of these splits (one pass over the inputs, on first use)."""
        return data_recipe(self.splits, self.dataset, self.split_seed, self.label_fraction, self.data)

    def labelled_set(self):
        """TensorDataset(x, y) of the labelled training rows."""
        return TensorDataset(*[t[self.labelled] for t in self.splits.train.tensors])

    def labelled_test_rows(self):
        """How many labelled training rows equal a test row (data whose X repeats rows of X_test)."""
        return int(np.isin(input_digests(TensorDataset(self.splits.train.tensors[0][self.labelled])),
                           input_digests(self.splits.test)).sum())


def load_data(dataset, data=None, split_seed=0, label_fraction=1.0):
    """load_dataset(dataset, root=data, seed=split_seed) with flat rows, and labelled_split of its
    training split at label_fraction (1: every row labelled)."""
    splits = load_dataset(dataset, root=data, seed=split_seed)
    for part in (splits.train, splits.test):
        part.tensors = (part.tensors[0].reshape(len(part.tensors[0]), -1), *part.tensors[1:])
    if splits.unlabelled is not None:
        splits.unlabelled = splits.unlabelled.reshape(len(splits.unlabelled), -1)
    y = splits.train.tensors[1]
    if label_fraction >= 1:
        lab, unl = torch.arange(len(y)), torch.empty(0, dtype=torch.long)
    else:
        lab, unl = labelled_split(y, label_fraction, split_seed)
    return PipelineData(splits, lab, unl, dataset, data, split_seed, label_fraction)


# ----------------------------------------------------------------------------------------------
# models that may not fit
# ----------------------------------------------------------------------------------------------
def build_checked(make, what, remedy="choose a smaller --hidden (or --bottleneck)"):
    """make() (a model's constructor), with a failed allocation refused as a ValueError saying that
    `what` does not fit in memory and `remedy`."""
    # An optimizer's first use imports torch._dynamo (torch._compile); after a model that fills the
    # address space that import dies as "SystemError: error return without exception set", not as a
    # MemoryError: loaded first, the failure is the optimizer's own allocation, worded below.
    import torch._dynamo  # noqa: F401
    try:
        return make()
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        raise ValueError(f"{what} does not fit in memory ({one_line(e)}); {remedy}") from None


# ----------------------------------------------------------------------------------------------
# training on labels: teachers, and the students of the labels-only baseline
# ----------------------------------------------------------------------------------------------
class _Cycled(Dataset):
    """`base` (a TensorDataset) cycled to `length` rows: row i is base row i mod len(base). A
    labels-only student then sees as many rows per epoch as a mimic student of the same transfer
    set, so both take the same number of optimizer steps under the same schedule."""

    def __init__(self, base, length):
        self.base, self.length = base, int(length)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.base[int(i) % len(self.base)]

    def get_batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long) % len(self.base)
        return tuple(t[idx] for t in self.base.tensors)


def train_on_labels(data, model, spec=None, out=None, file=TEACHER_FILE, *, resume=False, test=False,
                    rows=None, device=None, progress=False, extra=None, **options):
    """Train `model` with cross-entropy on the labelled rows (cycled to `rows` rows per epoch when
    given); test=True evaluates on the test split after each epoch. With `out`: a resumable run
    folder (train.train_teacher) whose checkpoint records the data recipe, and rank 0 writes
    out/`file`, a model file with the spec, the data recipe, the history, the precision it trained
    in and `extra`. options: train.TrainConfig fields. Returns the TrainResult."""
    dataset = data.labelled_set()
    if rows is not None:
        dataset = _Cycled(dataset, rows)
    if out is not None:
        refuse_links(out, [file])
    res = T.train_teacher(model, dataset, data.splits.test if test else None, out_dir=out,
                          resume=resume, device=device, progress=progress, spec=spec,
                          data=data.recipe if out is not None else None, **options)
    if out is not None and _is_rank0():
        save_model(os.path.join(out, file), res.model, spec, data=data.recipe, history=res.history,
                   precision=res.config.precision, **(extra or {}))
    return res


@dataclass
class Teachers:
    """One teacher (an ensemble of several) with its spec, its members and, for loaded files, each
    member's data recipe (None: the file records none) and the store identity of a teacher without
    weights or loaded from a file of the user's (TorchScript, .pt2, pickled module)."""

    teacher: torch.nn.Module
    spec: dict
    members: list
    recipes: list = field(default_factory=list)
    teacher_id: str = None


def _ensemble(members, specs):
    if len(members) == 1:
        return members[0].eval(), specs[0]
    return TeacherEnsemble(members).eval(), {"class": "TeacherEnsemble", "members": specs}


def teacher_member(data, channels, hidden, dnn_hidden, dropout):
    """(model, spec) of one ensemble member: a CNN for images, a DNN for flat rows."""
    shape, C = data.splits.input_shape, data.splits.num_classes
    if len(shape) == 3:
        kw = dict(channels=tuple(channels), hidden=tuple(hidden), dropout=dropout)
        return CNN(shape, C, **kw), {"name": "cnn", "kwargs": {
            "input_shape": list(shape), "num_classes": C, **kw}}
    kw = dict(hidden=tuple(dnn_hidden), dropout=dropout)
    return DNN(data.splits.in_features, C, **kw), {"name": "dnn-2k", "kwargs": {
        "in_features": data.splits.in_features, "num_classes": C, **kw}}


def train_teachers(data, members, *, epochs, batch_size, lr, weight_decay, channels, hidden,
                   dnn_hidden, dropout, out=None, hint="", device=None, progress=False, log=_quiet,
                   precision="fp32"):
    """The demo's teacher: `members` nets (teacher_member) trained on the labelled rows with SGD and
    a cosine schedule at `precision` (train.PRECISIONS), member m seeded 1000 * split_seed + m;
    their logits averaged. With `out`, member m is a resumable run in out/member-m whose teacher.pt
    is reused when it exists (refused, with `hint`, when made from another data recipe)."""
    models, specs = [], []
    for m in range(members):
        folder = None if out is None else os.path.join(out, f"member-{m}")
        path = None if folder is None else os.path.join(folder, TEACHER_FILE)
        if path is not None and os.path.isfile(path):
            model, payload = load_model(path)
            check_recipe(payload.get("data"), data.recipe, path, DATA_FIELDS, hint=hint)
            spec = payload["spec"]
        else:
            seed = 1000 * data.split_seed + m
            torch.manual_seed(seed)
            model, spec = teacher_member(data, channels, hidden, dnn_hidden, dropout)
            log(f"teacher member {m + 1}/{members}: {spec['name']} on {len(data.labelled)} labelled "
                "rows")
            res = train_on_labels(
                data, model, spec, folder,
                resume=folder is not None and os.path.isfile(os.path.join(folder, T.CHECKPOINT)),
                device=device, progress=progress, epochs=epochs, batch_size=batch_size,
                optimizer="sgd", lr=lr, weight_decay=weight_decay, schedule="cosine", seed=seed,
                precision=precision)
            model = res.model.cpu().eval()
        models.append(model)
        specs.append(spec)
    teacher, spec = _ensemble(models, specs)
    return Teachers(teacher, spec, models)


def load_teachers(paths, output=None):
    """The teacher files or factories `paths` (mimic_fast.teachers.load_teacher; several: their
    logits averaged), with the data recipe each records."""
    models, specs, recipes, files = [], [], [], []
    for p in paths:
        m, info = load_teacher(p, output=output)
        models.append(m)
        specs.append(info["spec"] or {"teacher": p, "kind": info["kind"], "output": output})
        recipes.append(info["data"])
        if info.get("sha256"):
            files.append(info["sha256"])
    teacher, spec = _ensemble(models, specs)
    # a plain function has no weights to fingerprint: the store knows it by the paths given
    teacher_id = None if any(True for _ in teacher.parameters()) else f"functions {list(paths)}"
    if files:  # a user's file carries no digest of ours: its bytes identify it (code included)
        teacher_id = f"{teacher_id or teacher_fingerprint(teacher)}; teacher files sha256 {files}"
    return Teachers(teacher, spec, models, recipes, teacher_id)


def check_teacher_data(paths, recipes, data, hint, unchecked=_quiet):
    """Refuse (ValueError) a teacher made from another data recipe than `data`'s: another split
    would put its training rows in the test set it is scored on. A teacher whose file records no
    recipe cannot be checked: unchecked(path) is called for it, in order. Returns, per teacher,
    whether it was checked."""
    for p, recipe in zip(paths, recipes):
        if recipe is None:
            unchecked(p)
        else:
            check_recipe(recipe, data.recipe, p, DATA_FIELDS, hint=hint)
    return [recipe is not None for recipe in recipes]


def probe_teacher(teacher, name, data):
    """Run the teacher on one training row before anything is written: a teacher for other inputs
    or another number of classes is refused here, naming it, not deep in the collection."""
    x = data.splits.train.tensors[0][:1]
    try:
        with torch.no_grad():
            out = teacher(x.to(param_dtype(teacher) or x.dtype))
    except (RuntimeError, TypeError, IndexError) as e:
        raise ValueError(f"teacher {name} fails on a --dataset row of shape {tuple(x.shape[1:])} "
                         f"(batch {tuple(x.shape)}): {type(e).__name__}: {one_line(e)}; it must take "
                         "rows of that shape") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"teacher {name} returned {shape} for a batch of shape {tuple(x.shape)}: "
                         "expected logits (batch, classes)")
    if out.shape[1] != data.splits.num_classes:
        raise ValueError(f"teacher {name} outputs {out.shape[1]} logits per row but the dataset has "
                         f"{data.splits.num_classes} classes: a teacher of another task")


# ----------------------------------------------------------------------------------------------
# the transfer set
# ----------------------------------------------------------------------------------------------
NOISE_STD = 0.1  # method "noise": the Gaussian's std, in the data's units


def transfer_recipe(data, n_generated=0, method="munge", generate_from="labelled", seed=0,
                    noise_std=NOISE_STD):
    """What a transfer set is made from: the data recipe and the transfer options (the one schema
    of transfer.pt's recipe)."""
    return {**data.recipe, "n_generated": n_generated, "method": method,
            "generate_from": generate_from, "seed": seed,
            "noise_std": noise_std if method == "noise" else None}


def build_transfer(data, n_generated=0, method="munge", generate_from="labelled", seed=0,
                   noise_std=NOISE_STD):
    """The labelled rows, then the unlabelled ones (training split, then the data's own
    X_unlabelled), then `n_generated` rows made by `method` (data.transfer) from the labelled rows
    (generate_from="all": from all of them); rows flat."""
    splits = data.splits
    X, y = splits.train.tensors
    X_lab = X[data.labelled]
    X_unl = X[data.unlabelled] if len(data.unlabelled) else None
    if splits.unlabelled is not None:
        X_unl = splits.unlabelled if X_unl is None else torch.cat([X_unl, splits.unlabelled])
    if method == "shift":  # shifting needs (N, C, H, W); rows go back flat afterwards
        if len(splits.input_shape) != 3:
            raise ValueError(f"method shift needs images (C, H, W); this data has rows of shape "
                             f"{tuple(splits.input_shape)}")
        X_lab = X_lab.reshape(len(X_lab), *splits.input_shape)
        X_unl = None if X_unl is None else X_unl.reshape(len(X_unl), *splits.input_shape)
    kwargs = {"std": noise_std} if method == "noise" else {}
    ts = build_transfer_set(X_lab, X_unl, n_generated=n_generated, method=method, seed=seed,
                            y_labelled=y[data.labelled], generate_from=generate_from, **kwargs)
    ts.x = ts.x.reshape(len(ts.x), -1)
    return ts


# where a transfer row that equals a test row came from (TransferSet.sources codes)
_LEAK_ORIGIN = ("the training split itself (X repeats rows of X_test)",
                "the training split (X) or X_unlabelled",
                "a generated row")


def _test_rows(digests, data, allowed, allow_option, where, sources=None):
    """The number of transfer rows (by their input `digests`) equal to a test row; refused unless
    allowed, naming the first and, given the rows' `sources`, where it came from."""
    hits = np.flatnonzero(np.isin(digests, input_digests(data.splits.test)))
    if len(hits) and not allowed:
        origin = "" if sources is None else f", from {_LEAK_ORIGIN[int(sources[int(hits[0])])]}"
        raise ValueError(f"{len(hits)} rows of {where} are test rows (first: row {int(hits[0])}"
                         f"{origin}): the student would train on the teacher's answers for the rows "
                         "it is tested on. Fix the data (no row of X or X_unlabelled may repeat a "
                         "test row)" + (f", or pass {allow_option} to keep them, knowingly"
                                        if allow_option else ""))
    return len(hits)


@dataclass
class Transfer:
    """A transfer set with its recipe, whether test rows were allowed in, how many there are, and
    its identity (files.transfer_digest)."""

    transfer: TransferSet
    recipe: dict
    allowed: bool
    test_rows: int
    digest: str


def transfer_set(path, data, n_generated=0, method="munge", generate_from="labelled", seed=0,
                 noise_std=NOISE_STD, *, overwrite=False, allow_test_rows=False, allow_option=None,
                 check=None, remedy="use another output folder", log=_quiet, warn=_quiet, wait=False,
                 hold=None):
    """The transfer set of this recipe at `path` (transfer.pt): reused when it exists (refused,
    with `remedy`, if made from another recipe: every field but the data file's path, since a moved
    file with the same rows is the same data), else built (build_transfer) and written there by
    rank 0 under the folder's logits_lock (refused while a student trains on the folder; wait=True
    waits), which `hold` (an ExitStack) keeps for a caller that goes on to write the logits. Rows
    equal to test rows are refused unless allow_test_rows (recorded in the file; a reused file keeps
    its own choice; `allow_option` names the caller's switch in the refusal) and then passed to
    `warn`. `check(transfer)` may refuse the set before anything is written."""
    recipe = transfer_recipe(data, n_generated, method, generate_from, seed, noise_std)
    reuse = os.path.exists(path) and not overwrite
    folder = os.path.dirname(os.path.abspath(path))
    if reuse:
        transfer, saved = load_transfer(path, remedy)
        check_recipe(saved["recipe"], recipe, path, [k for k in recipe if k != "data"], hint=remedy)
        allowed = bool(saved.get("allow_test_rows"))
        digest = saved["transfer_sha256"]
        log(f"reusing {path}: {transfer}")
    else:
        refuse_folder_links(folder)
        transfer = build_transfer(data, n_generated, method, generate_from, seed, noise_std)
        allowed = bool(allow_test_rows)
        digest = transfer_digest(transfer)
    n_test = _test_rows(input_digests(transfer), data, allowed, allow_option, "the transfer set",
                        transfer.sources)
    if check is not None:  # the caller's last word before anything is written
        check(transfer)
    if n_test:
        warn(f"{n_test} transfer rows are test rows ({allow_option or 'allowed'}): test accuracies of "
             "students trained on them are not held-out results")
    if not reuse:
        with contextlib.ExitStack() as held:
            def save():
                (hold or held).enter_context(logits_lock(folder, write=True, wait=wait))
                save_transfer(path, transfer, recipe, allow_test_rows=allowed, test_rows=n_test)
            on_rank0(save)
        log(f"transfer set {transfer}; wrote {path}")
    return Transfer(transfer, recipe, allowed, n_test, digest)


# ----------------------------------------------------------------------------------------------
# the teacher's logits
# ----------------------------------------------------------------------------------------------
@dataclass
class Logits:
    """A transfer set and the teacher's logits over it (a logit store), with the transfer set's
    recipe, its identity and whether test rows were allowed in."""

    transfer: TransferSet
    store: LogitStore
    recipe: dict
    transfer_digest: str
    allowed: bool = False

    @property
    def inputs(self):
        """The identities a student trained on these logits records (and a resume must match)."""
        return {"logit_store": self.store.digest, "transfer_set": self.transfer_digest}

    @cached_property
    def largest(self):
        """The largest |logit| of the store (one pass over it, on first use)."""
        top, step = 0.0, 65536
        for lo in range(0, self.store.committed_rows, step):
            rows = np.asarray(self.store.logits[lo:lo + step], np.float64)
            top = max(top, float(np.abs(rows).max()))
        return top


def collect(teacher, transfer, folder, dtype=torch.float16, batch_size=256, device=None,
            progress=False, overwrite=False, teacher_id=None, remedy=REUSE_REMEDY, wait=False,
            teacher_name="teacher"):
    """The teacher's logits over `transfer` (a Transfer) in folder/logits (data.collect_logits:
    resumed when interrupted, reused when complete, refused when made by another teacher, or while
    a student trains on them unless it may be reused; wait=True waits)."""
    refuse_folder_links(folder)
    store = collect_logits(teacher, transfer.transfer, os.path.join(folder, LOGITS_DIR),
                           batch_size=batch_size, dtype=dtype, device=device, progress=progress,
                           overwrite=overwrite, teacher_id=teacher_id, remedy=remedy, wait=wait,
                           teacher_name=teacher_name)
    return Logits(transfer.transfer, store, transfer.recipe, transfer.digest, transfer.allowed)


def read_transfer(folder):
    """(TransferSet, payload) of folder/transfer.pt, the folder of collect-logits, import-logits or
    a sweep."""
    path = os.path.join(folder, TRANSFER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --logits must be the --out folder of "
                                "`mimic-fast collect-logits` (or of a sweep)")
    return load_transfer(path, "rebuild it with `mimic-fast collect-logits ... --overwrite`")


def open_logits(folder, data, transfer, payload, verify=True, check_inputs="all"):
    """The transfer set and logit store of `folder` (read_transfer's transfer and payload) for
    students of `data`: refused when the rows have another width, the recipe another split or
    labelled fraction (test rows would reach training), the store other rows or classes, or the
    transfer set test rows it did not allow."""
    path = os.path.join(folder, TRANSFER_FILE)
    made = payload.get("recipe") or {}
    # the student is sized from the data: other data than the logits' would fail deep in a kernel
    width = transfer.x[0].numel()
    if width != data.splits.in_features:
        raise ValueError(f"--logits {folder} holds rows of {width} features (made from --dataset "
                         f"{made.get('dataset')} --data {made.get('data')}), but --dataset "
                         f"{data.dataset} has {data.splits.in_features} features")
    # the transfer set's labels and its exclusion of test rows hold only for the recipe it was made
    # with: another split seed or label fraction here would put test rows into training
    check_recipe(made, data.recipe, path, DATA_FIELDS,
                 hint="distill with the recipe of the logits (leave --split-seed and --label-fraction "
                      "unset to inherit it) or collect logits for this one")
    store = LogitStore.open(os.path.join(folder, LOGITS_DIR), transfer, verify=verify,
                            check_inputs=check_inputs)
    if store.num_classes != data.splits.num_classes:
        raise ValueError(f"--logits {folder} holds {store.num_classes} classes but --dataset "
                         f"{data.dataset} has {data.splits.num_classes}")
    if len(transfer.labels) and int(transfer.labels.max()) >= data.splits.num_classes:
        raise ValueError(f"{path} holds label {int(transfer.labels.max())} but --dataset "
                         f"{data.dataset} has {data.splits.num_classes} classes (0.."
                         f"{data.splits.num_classes - 1}): it was not made from this data; "
                         "rebuild it with `mimic-fast collect-logits ... --overwrite`")
    allowed = bool(payload.get("allow_test_rows"))
    _test_rows(store.inputs, data, allowed, "--allow-test-rows", f"the transfer set {path}")
    return Logits(transfer, store, made, payload["transfer_sha256"], allowed)


# ----------------------------------------------------------------------------------------------
# the student
# ----------------------------------------------------------------------------------------------
def check_logit_scale(logits, batch_size):
    """Refuse logits (a Logits) whose squared error overflows float32 before any step is taken: a
    batch's sum of squares reaches batch_size * C * max|logit|**2, and a loss of inf would otherwise
    be reported as a divergence, whose remedy (a lower learning rate) cannot help."""
    store = logits.store
    batch_size = max(1, int(batch_size))  # validated with the other options
    limit = (float(torch.finfo(torch.float32).max) / (4 * batch_size * store.num_classes)) ** 0.5
    if logits.largest > limit:
        raise ValueError(f"the logits in {store.path} reach |logit| {logits.largest:.3g}: their "
                         f"squared error over a batch of {batch_size} rows x {store.num_classes} "
                         f"classes overflows float32 (|logit| must stay below {limit:.3g}), whatever "
                         "the learning rate; logits that large are not a teacher's scores: check the "
                         "teacher or rescale the logits (e.g. divide every row by one constant) and "
                         "import them again")


def distill_student(data, student, spec, logits, out=None, *, test=True, loss="mse", alpha=0.0,
                    temperature=4.0, check_inputs="all", resume=False, device=None,
                    progress=False, extra=None, wait=False, **options):
    """Train `student` on the teacher's logits (train.distill: logit regression or KD, mixed with
    the hard labels at `alpha`); test=True evaluates on the test split after each epoch. The store
    is held shared (LogitDataset) until student.pt is written: no process rewrites it meanwhile
    (one that is writing it makes this fail naming its pid; wait=True waits). With `out`: a
    resumable run folder whose checkpoint records the data recipe and the inputs' identities
    (Logits.inputs: a resume on other logits or another transfer set is refused), and rank 0 writes
    out/student.pt with the spec, the data recipe, the history, the loss, the transfer set's
    recipe, the inputs and the precision it trained in (+ `extra`). options: train.TrainConfig
    fields. Returns the TrainResult."""
    if loss == "mse":
        check_logit_scale(logits, options.get("batch_size", T.TrainConfig.batch_size))
    if out is not None:
        refuse_links(out, [STUDENT_FILE])
    with LogitDataset(logits.transfer, logits.store, with_labels=alpha > 0,
                      check_inputs=check_inputs, wait=wait) as dataset:
        res = T.distill(student, dataset, data.splits.test if test else None, loss=loss,
                        alpha=alpha, temperature=temperature, out_dir=out, resume=resume,
                        device=device, progress=progress, spec=spec,
                        data=data.recipe if out is not None else None, inputs=logits.inputs,
                        **options)
        if out is not None and _is_rank0():
            save_model(os.path.join(out, STUDENT_FILE), res.model, spec, data=data.recipe,
                       history=res.history, loss=loss, alpha=alpha, transfer=logits.recipe,
                       inputs=logits.inputs, precision=res.config.precision, **(extra or {}))
    return res
