"""Detectors: pure functions of the StepStats stream (no torch import).

One module per mechanism family; each documents its rule, thresholds and sources.
"""
from .base import Detector
from .gradients import VanishingGradientDetector
from .gradient_flow import ZeroGradientDetector
from .logits import LogitDriftDetector
from .nonfinite import NonFiniteDetector
from .optimizer import OptimizerStallDetector
from .progress import DivergenceDetector, PlateauDetector
from .spikes import GradExplosionDetector, LossSpikeDetector
from .units import DeadUnitsDetector, SaturationDetector


#: the detectors that judge the loss's value: its spikes, its progress (divergence) and its
#: stalls (plateau). ``judge_loss=False`` leaves them out; a non-finite loss is still judged
#: (:class:`NonFiniteDetector`), and so are the gradients, units and optimizer state.
LOSS_DETECTORS: tuple[type[Detector], ...] = (LossSpikeDetector, DivergenceDetector,
                                              PlateauDetector)


def default_detectors(judge_loss: bool = True) -> list[Detector]:
    """One detector per finding kind, with the documented default thresholds
    (``judge_loss=False``: without :data:`LOSS_DETECTORS`)."""
    dets: list[Detector] = [
        NonFiniteDetector(), LossSpikeDetector(), GradExplosionDetector(),
        VanishingGradientDetector(), DeadUnitsDetector(), SaturationDetector(),
        DivergenceDetector(), PlateauDetector(), ZeroGradientDetector(),
        OptimizerStallDetector(), LogitDriftDetector()]
    return dets if judge_loss else [d for d in dets if not isinstance(d, LOSS_DETECTORS)]


__all__ = ["Detector", "NonFiniteDetector", "LossSpikeDetector", "GradExplosionDetector",
           "VanishingGradientDetector", "DeadUnitsDetector", "SaturationDetector",
           "DivergenceDetector", "PlateauDetector", "ZeroGradientDetector", "OptimizerStallDetector",
           "LogitDriftDetector", "LOSS_DETECTORS", "default_detectors"]
