"""The exceptions mlo raises. Each message names the level, edge or option at fault."""

from __future__ import annotations


class MLOError(Exception):
    """Base class of every error mlo raises on purpose."""


class ProgramError(MLOError, ValueError):
    """The program (levels, graph, estimators) is malformed; raised when the Engine is built."""


class GraphError(ProgramError):
    """The dependency graph names an unknown level, repeats a level or contains a cycle."""


class EstimatorError(ProgramError):
    """An estimator name or option is invalid, or an estimator cannot serve an edge."""


class ArgumentError(ProgramError, TypeError):
    """A level, a transform or a registered program was given an argument of the wrong type; the
    message names the argument (and the level)."""


class UnknownProgramError(MLOError, KeyError):
    """`mlo.programs.get` was given a name no program is registered under; the message lists them."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class LossError(ProgramError, TypeError):
    """A level's loss returned something other than a one-element floating-point tensor."""


class UnknownLevelError(MLOError, KeyError):
    """A method was given a level name the program does not have; the message lists the levels."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class NonFiniteError(MLOError, FloatingPointError):
    """A loss or a hypergradient became NaN or infinite during a run."""


class DivergenceError(MLOError, ArithmeticError):
    """An iterative estimator diverged (for example a Neumann series whose terms grow)."""


class CheckpointError(MLOError, OSError):
    """A checkpoint file is missing, truncated, corrupt, or holds something other than plain values."""


class ConfigError(MLOError, ValueError):
    """A configuration value is invalid; the message names the option."""


class DataError(MLOError, FileNotFoundError, ValueError):
    """A data directory is missing, incomplete or malformed (the message says how to fix it)."""


class GenotypeError(MLOError, ValueError):
    """A genotype (or a genotype file) is malformed: unknown op, bad index, wrong structure."""


def first_line(err: BaseException | None) -> str:
    """The first line of an exception's message (for errors that quote another)."""
    return (str(err).strip().splitlines() or [""])[0]


class MLOWarning(UserWarning):
    """Base class of every warning mlo gives: filter them all with
    ``warnings.simplefilter("ignore", mlo.MLOWarning)`` (or ``"error"`` to stop at the first)."""


class ConvergenceWarning(MLOWarning):
    """An iterative solve stopped far from its answer (for example CG on an indefinite Hessian)."""


class CheckWarning(MLOWarning):
    """`mlo.check` found a hypergradient further from its reference than the threshold, or a
    reference that did not converge."""


class ZeroGradientWarning(MLOWarning):
    """A level's gradient or hypergradient is exactly zero at its first evaluation: its loss
    reads none of its own parameters, or nothing reaches them through its lower levels (a graph
    forgotten, ``graph={}``). Given once per level."""


class DisconnectedEdgeWarning(ZeroGradientWarning):
    """An edge's mixed derivative is zero by construction: the lower level's loss does not read
    the upper level's parameters, so the upper's hypergradient gets nothing through that edge.
    Given once per edge, at the upper level's first step."""


class DivergenceWarning(MLOWarning):
    """A level's loss grew by more than ``Engine(divergence_factor=...)`` over its first value:
    its optimizer is likely diverging (a learning rate too large for the curvature its upper
    level set), long before anything becomes infinite. Given once per level."""


class CheckpointWarning(MLOWarning):
    """A checkpoint was skipped (truncated or corrupt) and an older intact one used instead."""
