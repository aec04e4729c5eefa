"""Data recipes: what a pipeline file (teacher.pt, transfer.pt, student.pt) was made from, as a dict,
and the one check that a later step asks for the same thing.

A recipe names the dataset, its split seed and label fraction, and fingerprints of the train and test
inputs it produced (so a changed data file, or another split, cannot pass under the same names);
transfer sets add their own options. Two recipes are compared field by field and a mismatch is
refused listing every differing field: test rows must never reach a teacher's or a student's
training data by a seed or a fraction that silently differs from the one recorded.
"""
import os

from .identity import fingerprint

__all__ = ["DATA_FIELDS", "data_recipe", "recipe_differences", "check_recipe"]

# the fields that decide which rows are train, test and labelled
DATA_FIELDS = ("dataset", "split_seed", "label_fraction", "train_rows", "test_rows")


def data_recipe(splits, dataset, split_seed, label_fraction, data=None):
    """The recipe of DataSplits `splits` loaded as `dataset` (+ `data` path) with this split seed
    and label fraction: a JSON-able dict (paths made absolute; row fingerprints of train and test:
    one pass over the inputs)."""
    return {"dataset": dataset, "data": None if data is None else os.path.abspath(data),
            "split_seed": split_seed, "label_fraction": label_fraction,
            "input_shape": list(splits.input_shape), "num_classes": splits.num_classes,
            "train_rows": fingerprint(splits.train), "test_rows": fingerprint(splits.test)}


def recipe_differences(recorded, wanted, fields=None):
    """{field: (recorded value, wanted value)} for every field of `fields` (default: every field of
    `wanted`) on which the two differ; a field the recorded recipe lacks differs too."""
    fields = list(wanted) if fields is None else list(fields)
    missing = object()
    out = {}
    for f in fields:
        a, b = recorded.get(f, missing), wanted.get(f, missing)
        if a != b:
            out[f] = (None if a is missing else a, None if b is missing else b)
    return out


def check_recipe(recorded, wanted, source, fields=None, hint=""):
    """Raise ValueError listing every differing field when `recorded` (the recipe stored in
    `source`, e.g. "teacher.pt") and `wanted` (what this step asks for) differ on `fields`."""
    if recorded is None:
        raise ValueError(f"{source} records no data recipe, so it cannot be checked against this "
                         f"one; {hint or 'rebuild it with this version of mimic_fast'}")
    diff = recipe_differences(recorded, wanted, fields)
    if diff:
        listed = "; ".join(f"{f}: {a!r} in {source}, {b!r} here" for f, (a, b) in diff.items())
        raise ValueError(f"{source} was made from another data recipe ({listed}){': ' + hint if hint else ''}")
