"""The stability zoo: reproducible pathological and healthy training runs, scored."""
from .base import REGISTRY, RunResult, Scenario, Setup, register, train

__all__ = ["REGISTRY", "RunResult", "Scenario", "Setup", "register", "train"]
