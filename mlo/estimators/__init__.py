"""Hypergradient estimators and their registry.

Each estimator is a small frozen dataclass whose fields are its options, registered by name::

    from mlo import estimators
    estimators.names()                       # ['cg', 'finite_difference', 'first_order', 'neumann', 'sama', 'unroll']
    estimators.get("cg", iterations=20)      # CG(iterations=20, tol=1e-10, damping=0.0, hessian='total')
    estimators.parse("neumann:alpha=0.05")   # from a config string or a command-line flag
"""

from .base import Curvature, Estimator, Hop, Info, Norm
from .cg import CG
from .finite_difference import FiniteDifference
from .first_order import FirstOrder
from .neumann import Neumann
from .registry import get, names, parse, register, resolve
from .sama import Sama
from .unroll import Unroll

__all__ = [
    "Estimator",
    "Hop",
    "Info",
    "Norm",
    "Curvature",
    "CG",
    "FiniteDifference",
    "FirstOrder",
    "Neumann",
    "Unroll",
    "Sama",
    "get",
    "names",
    "parse",
    "register",
    "resolve",
]
