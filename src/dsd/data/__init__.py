"""The data of `dsd train`: each task's tensors from local data (never downloaded), and the
batches a rank trains on.

- "mnist1d" (mnist1d.py), "digits" (digits.py): generated or shipped with a package.
- "cifar10", "cifar100" (cifar.py): the extracted python archives, read with a restricted
  unpickler (safe_pickle.py); training batches are augmented (augment.py).
- "text" (text.py): characters of a UTF-8 file or of an embedded corpus.
- "tensors" (tensors.py): the caller's own tensors from a .pt or .npz file.

Validation is carved from the training set with a fixed seed (splits.py); alter.py shrinks the
training split or makes its labels noisy; batches.py orders and cuts each epoch's batches.
"""

from .alter import alter_training
from .task_data import DataError, TaskData
from .tasks import DATA_TASKS, TASKS, load_task

__all__ = ["DATA_TASKS", "TASKS", "DataError", "TaskData", "alter_training", "load_task"]
