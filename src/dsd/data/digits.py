"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package), with a
stratified quarter held out as test."""

import functools

from .arrays import standardised_task
from .task_data import TaskData


def load(val_fraction: float) -> TaskData:
    x, y, x_test, y_test = _shipped()
    return standardised_task("digits", "image", (8, 8), x, y, x_test, y_test,
                             val_fraction=val_fraction,
                             source="embedded: scikit-learn load_digits")


@functools.lru_cache(maxsize=1)
def _shipped():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test
