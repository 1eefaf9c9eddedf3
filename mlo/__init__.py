"""mlo: multi-level optimization for PyTorch.

Declare each level as a ``Problem``, wire the levels into a dependency graph, and hand them to an
``Engine`` with a hypergradient estimator from ``mlo.estimators``.
"""

from . import checking, checkpoint, config, distributed, estimators, loader, logs, precision, programs, tasks, transforms
from .checking import CheckReport, EdgeCheck, check
from .engine import Engine
from .errors import (
    ArgumentError,
    CheckpointError,
    CheckpointWarning,
    CheckWarning,
    ConfigError,
    ConvergenceWarning,
    DataError,
    DisconnectedEdgeWarning,
    DivergenceError,
    DivergenceWarning,
    EstimatorError,
    GenotypeError,
    GraphError,
    LossError,
    MLOError,
    MLOWarning,
    NonFiniteError,
    ProgramError,
    UnknownLevelError,
    UnknownProgramError,
    ZeroGradientWarning,
)
from .hooks import Hook
from .rule import hypergradient
from .problem import Problem, cycle, derivative_wanted

__all__ = [
    "Problem",
    "cycle",
    "derivative_wanted",
    "Engine",
    "hypergradient",
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
    "ConfigError",
    "DataError",
    "GenotypeError",
    "LossError",
    "UnknownLevelError",
    "UnknownProgramError",
    "ArgumentError",
    "MLOWarning",
    "ConvergenceWarning",
    "CheckWarning",
    "CheckpointWarning",
    "ZeroGradientWarning",
    "DisconnectedEdgeWarning",
    "DivergenceWarning",
    "check",
    "CheckReport",
    "EdgeCheck",
]
__version__ = "0.1.0"
