"""Engines that run an mlo program: mlo's own ``mlo.Engine``, and adapters to other libraries.

- `mlo.engines.betty`: the same Problems, graph and estimator on Betty's engine (betty-ml 0.2.x,
  an optional dependency imported when the adapter is used).
"""
