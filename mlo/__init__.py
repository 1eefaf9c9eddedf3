"""mlo: multi-level optimization for PyTorch.

Declare each level as a ``Problem``, wire the levels into a dependency graph, and hand them to an
``Engine`` with a hypergradient estimator from ``mlo.estimators``.
"""

from . import checking, checkpoint, config, distributed, estimators, loader, logs, precision, programs, tasks, transforms
from .checking import CheckReport, EdgeCheck, check
from .engine import Engine
from .errors import (
    CheckpointError,
    CheckWarning,
    ConvergenceWarning,
    DivergenceError,
    EstimatorError,
    GraphError,
    LossError,
    MLOError,
    NonFiniteError,
    ProgramError,
    UnknownLevelError,
)
from .hooks import Hook
from .problem import Problem, cycle

__all__ = [
    "Problem",
    "cycle",
    "Engine",
    "Hook",
    "estimators",
    "config",
    "programs",
    "tasks",
    "transforms",
    "checkpoint",
    "loader",
    "logs",
    "precision",
    "distributed",
    "MLOError",
    "ProgramError",
    "GraphError",
    "EstimatorError",
    "NonFiniteError",
    "DivergenceError",
    "CheckpointError",
    "LossError",
    "UnknownLevelError",
    "ConvergenceWarning",
    "CheckWarning",
    "check",
    "CheckReport",
    "EdgeCheck",
]
__version__ = "0.1.0"
