"""The methods `mlo run` compares, all on the same code path and budget: LFM-CW, the DARTS
baselines and the LFM-CW ablations. Each is a `Variant` of the program and a default estimator."""

from __future__ import annotations

from dataclasses import dataclass

from .program import Variant

__all__ = ["Method", "METHODS"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    variant: Variant
    estimator: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lfm-cw", "LFM-CW: class weights from W1's mistakes and a learned correction, synthetic data", Variant(), "finite_difference"),
        Method("darts-1st", "DARTS first order", Variant(second_model=False), "first_order"),
        Method("darts-2nd", "DARTS second order (finite differences)", Variant(second_model=False), "finite_difference"),
        Method("darts-2nd-balanced", "DARTS second order with a class-balanced loss (inverse class frequency)",
               Variant(second_model=False, balanced_loss=True), "finite_difference"),
        Method("lfm-cw-uniform", "ablation: uniform class weights (c = 1)", Variant(learn_phi=False, use_mistakes=False), "finite_difference"),
        Method("lfm-cw-nogen", "ablation: no generator (W2 reweights real data by c)", Variant(generator=False), "finite_difference"),
        Method("lfm-cw-aug", "ablation: the 'generator' returns a random augmentation of a real image of class k",
               Variant(augmented_real=True), "finite_difference"),
        Method("lfm-cw-mistakes", "ablation: class weights from mistakes only (phi frozen)", Variant(learn_phi=False), "finite_difference"),
    )
}
