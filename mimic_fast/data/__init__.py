"""The data half of the mimic pipeline: data sets, transfer sets, data recipes and the teacher-logit
store.

Imported only on demand (`import mimic_fast` does not load it); scikit-learn is loaded only by the
functions that use it.
"""
from .datasets import DataSplits, load_dataset
from .recipe import check_recipe, data_recipe, recipe_differences
from .store import (LogitDataset, LogitStore, collect_logits, fingerprint, input_digests,
                    teacher_fingerprint)
from .transfer import TransferSet, add_noise, build_transfer_set, munge, random_shift

__all__ = ["DataSplits", "load_dataset", "LogitDataset", "LogitStore", "collect_logits", "fingerprint",
           "input_digests", "teacher_fingerprint", "TransferSet", "add_noise", "build_transfer_set",
           "munge", "random_shift", "check_recipe", "data_recipe", "recipe_differences"]
