"""mlo's benchmark suites (``mlo bench SUITE``): estimator accuracy against cost, speed and memory
against a hand-written loop and other libraries, and LFM-CW against its baselines.

Shared pieces: `timing` (interleaved timing, peak memory, JSON), `report` (ratios, tables),
`workloads` (the bilevel programs the speed suite times), `references` (programs with known answers),
`implementations` and `handwritten` (the rounds each library runs). Suites: `speed`,
`estimators`, `lfm_cw`; the command line: `cli`.
"""
