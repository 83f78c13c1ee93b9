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


def default_detectors() -> list[Detector]:
    """One detector per finding kind, with the documented default thresholds."""
    return [NonFiniteDetector(), LossSpikeDetector(), GradExplosionDetector(),
            VanishingGradientDetector(), DeadUnitsDetector(), SaturationDetector(),
            DivergenceDetector(), PlateauDetector(), ZeroGradientDetector(),
            OptimizerStallDetector(), LogitDriftDetector()]


__all__ = ["Detector", "NonFiniteDetector", "LossSpikeDetector", "GradExplosionDetector",
           "VanishingGradientDetector", "DeadUnitsDetector", "SaturationDetector",
           "DivergenceDetector", "PlateauDetector", "ZeroGradientDetector", "OptimizerStallDetector",
           "LogitDriftDetector", "default_detectors"]
