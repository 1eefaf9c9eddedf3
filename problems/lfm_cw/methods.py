"""The methods `mlo run` compares, all on the same code path and budget: LFM-CW, the DARTS
baselines and the LFM-CW ablations. Each is a `Variant` of the program and a default estimator.

LFM-CW and its ablations default to ``unroll:steps=1`` on every edge: the exact derivative of
DARTS's one-step look-ahead, which costs about what its finite difference costs and, unlike the
difference in float32, is not mostly rounding on the ``architecture -> w2`` edge of a fresh W2.
``darts-2nd`` keeps DARTS's own central difference (``finite_difference``), for fidelity to the
paper; ``--estimator`` sets any method's."""

from __future__ import annotations

from dataclasses import dataclass

from .program import Variant

__all__ = ["Method", "METHODS", "LFM_ESTIMATOR"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    variant: Variant
    estimator: str


#: the default estimator of LFM-CW's edges (every method with a second model)
LFM_ESTIMATOR = "unroll:steps=1"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lfm-cw", "LFM-CW: class weights from W1's mistakes and a learned correction, synthetic data", Variant(), LFM_ESTIMATOR),
        Method("darts-1st", "DARTS first order", Variant(second_model=False), "first_order"),
        Method("darts-2nd", "DARTS second order (finite differences)", Variant(second_model=False), "finite_difference"),
        Method("darts-2nd-balanced", "DARTS second order with a class-balanced loss (inverse class frequency)",
               Variant(second_model=False, balanced_loss=True), "finite_difference"),
        Method("lfm-cw-uniform", "ablation: uniform class weights (c = 1)", Variant(learn_phi=False, use_mistakes=False), LFM_ESTIMATOR),
        Method("lfm-cw-nogen", "ablation: no generator (W2 reweights real data by c)", Variant(generator=False), LFM_ESTIMATOR),
        Method("lfm-cw-aug", "ablation: the 'generator' returns a random augmentation of a real image of class k",
               Variant(augmented_real=True), LFM_ESTIMATOR),
        Method("lfm-cw-mistakes", "ablation: class weights from mistakes only (phi frozen)", Variant(learn_phi=False), LFM_ESTIMATOR),
    )
}
