"""training: the paper's presets on real datasets, resumable and distributed runs.

* :data:`PRESETS` / :func:`get_preset`: the nine paper models and Fashion-MNIST versions.
* :func:`load_dataset`: MNIST, Fashion-MNIST (offline from Debian), SVHN, CIFAR-10, synthetic.
* :class:`TrainOptions` / :func:`train`: the loop (``mondeq train``).
* :func:`evaluate`: accuracy, solver statistics and certified accuracy (``mondeq eval``).
"""

from .data import DataError, load_dataset
from .evaluate import evaluate
from .presets import PRESETS, Preset, get_preset
from .trainer import Interrupted, TrainOptions, train

__all__ = [
    "PRESETS",
    "DataError",
    "Interrupted",
    "Preset",
    "TrainOptions",
    "evaluate",
    "get_preset",
    "load_dataset",
    "train",
]
