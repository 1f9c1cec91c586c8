"""training: the paper's presets on real datasets, resumable and distributed runs.

* :data:`PRESETS` / :func:`get_preset`: the nine paper models and Fashion-MNIST versions.
* :func:`load_dataset`: MNIST, Fashion-MNIST (offline from Debian), SVHN, CIFAR-10, synthetic.
* :class:`TrainOptions` / :func:`train`: a training run (``mondeq train``): options
  (:mod:`~training.options`), setup (:mod:`~training.setup`), the loop
  (:mod:`~training.loop`), the run folder's files (:mod:`~training.runfolder`).
* :func:`evaluate`: accuracy, solver statistics and certified accuracy (``mondeq eval``).
"""

from .data import DataError, load_dataset
from .evaluate import evaluate
from .loop import Diverged, train
from .options import TrainOptions
from .presets import PRESETS, Preset, get_preset
from .signals import Aborted, Interrupted

__all__ = [
    "PRESETS",
    "Aborted",
    "DataError",
    "Diverged",
    "Interrupted",
    "Preset",
    "TrainOptions",
    "evaluate",
    "get_preset",
    "load_dataset",
    "train",
]
