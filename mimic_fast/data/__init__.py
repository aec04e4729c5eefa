"""The data half of the mimic pipeline: data sets, transfer sets and the teacher-logit store.

Imported only on demand (`import mimic_fast` does not load it); scikit-learn is loaded only by the
functions that use it.
"""
from .datasets import DataSplits, load_dataset
from .store import LogitDataset, LogitStore, collect_logits, fingerprint, teacher_fingerprint
from .transfer import TransferSet, add_noise, build_transfer_set, munge, random_shift

__all__ = ["DataSplits", "load_dataset", "LogitDataset", "LogitStore", "collect_logits", "fingerprint",
           "teacher_fingerprint", "TransferSet", "add_noise", "build_transfer_set", "munge",
           "random_shift"]
