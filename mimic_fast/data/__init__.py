"""The data half of the mimic pipeline: data sets, transfer sets, data recipes, identities (row
digests, fingerprints) and the teacher-logit store (its format and reader in `store`, filling it in
`collect`).

Imported only on demand (`import mimic_fast` does not load it); scikit-learn is loaded only by the
functions that use it.
"""
from .collect import collect_logits
from .datasets import DATASETS, DataSplits, labelled_split, load_dataset
from .identity import fingerprint, input_digests, state_hash, teacher_fingerprint
from .recipe import check_recipe, data_recipe, recipe_differences
from .store import LogitDataset, LogitStore
from .transfer import TransferSet, add_noise, build_transfer_set, munge, random_shift

__all__ = ["DATASETS", "DataSplits", "load_dataset", "labelled_split", "LogitDataset", "LogitStore",
           "collect_logits", "fingerprint", "input_digests", "state_hash", "teacher_fingerprint",
           "TransferSet", "add_noise", "build_transfer_set", "munge", "random_shift", "check_recipe",
           "data_recipe", "recipe_differences"]
