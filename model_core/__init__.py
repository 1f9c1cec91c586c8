"""model_core: monotone operator equilibrium networks (Winston & Kolter, NeurIPS 2020).

The public API is this page; everything else is implementation.

* :func:`build_model` / :class:`MonDEQClassifier`: classifiers from a :class:`ModelConfig` or
  its dict; :class:`InputSpec`: the input's shape, normalisation and class names.
* Architectures: :func:`register_architecture` (a new one is one builder; see
  :mod:`model_core.config`).
* :func:`save_checkpoint` / :func:`load_checkpoint` / :class:`CheckpointError`.
* :func:`tune_alpha`: the step-size search (docs/math.md §6).
* :func:`solve_forward` / :func:`solve_backward` / :class:`SolveStats`.
* Solvers: :class:`SplittingMethod`, :func:`register_solver`, :func:`get_solver`, :data:`SOLVERS`
  (a new solver is one registered class; see :mod:`model_core.solvers`).
* Operators (:class:`FCOperator`, :class:`MultiTierOperator`) and nonlinearities.
"""

from .checkpoint import SCHEMA_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from .config import ArchitectureParts, InputSpec, ModelConfig, register_architecture
from .equilibrium import EquilibriumLayer, SolverSettings
from .models import InferenceResult, MonDEQClassifier, build_model, normalize_config
from .nonlinearity import BorderReLU, Nonlinearity, ReLU
from .operators import FCOperator, MonotoneOperator, MultiTierOperator, Resolvent
from .solvers import (
    SOLVERS,
    SolveStats,
    SplittingMethod,
    get_solver,
    register_solver,
    solve_backward,
    solve_forward,
)
from .tuning import AlphaTuning, tune_alpha

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "SOLVERS",
    "AlphaTuning",
    "ArchitectureParts",
    "BorderReLU",
    "CheckpointError",
    "EquilibriumLayer",
    "FCOperator",
    "InferenceResult",
    "InputSpec",
    "ModelConfig",
    "MonDEQClassifier",
    "MonotoneOperator",
    "MultiTierOperator",
    "Nonlinearity",
    "ReLU",
    "Resolvent",
    "SolveStats",
    "SolverSettings",
    "SplittingMethod",
    "build_model",
    "get_solver",
    "load_checkpoint",
    "normalize_config",
    "register_architecture",
    "register_solver",
    "save_checkpoint",
    "solve_backward",
    "solve_forward",
    "tune_alpha",
]
