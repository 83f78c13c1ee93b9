"""The scenario contract of the stability zoo and the one training loop every mode shares.

A scenario is a small, seeded, real training run on CPU. ``build(seed)`` returns a fresh
:class:`Setup` (model, optimizer, batches, loss); :func:`train` runs it bare, guarded, or
with a baseline remedy, and returns a :class:`RunResult` that the scenario's ``passed``
criterion judges.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    #: yields (x, y) batches; called once per run, must yield at least ``steps`` batches
    batches: Callable[[], Iterator[tuple[Any, Any]]]
    #: loss_fn(model_output, y) -> scalar tensor
    loss_fn: Callable[[Any, Any], torch.Tensor]
    steps: int
    #: final metric of the trained model (lower is better unless ``higher_is_better``)
    evaluate: Callable[[nn.Module], float]
    higher_is_better: bool = False
    scheduler: Any = None
    #: "plateau" schedulers are stepped with the loss, others once per applied update
    scheduler_kind: str = "step"
    scaler: Any = None
    #: autocast dtype (torch.bfloat16 / torch.float16) or None
    autocast: Any = None
    #: forward(model, x) -> output, when the model is not simply model(x)
    forward: Callable[[nn.Module, Any], Any] | None = None
    #: extra keyword arguments for tg.Guard (e.g. sample_every) the scenario needs
    guard_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    mode: str
    losses: list[float]
    metric: float
    seconds: float
    finished: bool  # False when training raised (TrainingUnstable or a crash)
    error: str | None = None
    findings: list = field(default_factory=list)  # tg.Finding
    actions: list = field(default_factory=list)  # tg.Action
    guard: Any = None

    @property
    def final_loss(self) -> float:
        tail = self.losses[-20:] if self.losses else [math.nan]
        return float(sum(tail) / len(tail))

    @property
    def nonfinite(self) -> bool:
        return any(not math.isfinite(v) for v in self.losses) or not math.isfinite(self.metric)


@dataclass
class Scenario:
    name: str
    category: str  # "pathological" | "healthy"
    #: the mechanism in words, e.g. "vanishing gradients in a deep sigmoid MLP"
    mechanism: str
    #: finding kinds that name this mechanism correctly (empty for healthy controls)
    expected: tuple[str, ...]
    source: str  # paper / research note section the setup comes from
    criterion: str  # the pass criterion in words
    build: Callable[[int], Setup]
    passed: Callable[[RunResult], bool]
    #: can a running guard repair it (skip/clip/lr/rollback), or does it need the doctor?
    repairable_online: bool = True
    #: what the doctor should prescribe when it is not repairable online
    prescription: str = ""
    fast: bool = False  # part of the test-suite subset
    #: the step at which the pathology starts (detection delay = first detection - onset);
    #: 0 for faults present from initialisation
    onset: int = 0
    #: the healthy reference for the final metric: the threshold of the pass criterion or the
    #: repaired config's metric (None: the runner looks for a module-level ``THRESHOLD``)
    reference: float | None = None

    def __post_init__(self) -> None:
        if self.category not in ("pathological", "healthy"):
            raise ValueError(f"category must be 'pathological' or 'healthy', got {self.category!r}")


REGISTRY: dict[str, Scenario] = {}


def register(s: Scenario) -> Scenario:
    if s.name in REGISTRY:
        raise ValueError(f"scenario {s.name!r} registered twice")
    REGISTRY[s.name] = s
    return s


def _to(v: Any, device: str) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (tuple, list)):
        return type(v)(_to(u, device) for u in v)
    return v


def on_device(setup: Setup, device: str) -> Setup:
    """The same run on another device (real fp16/bf16 kernels on CUDA): the model moves in
    place (the optimizer keeps its parameters), batches follow it, a GradScaler and autocast
    switch to the device's, and evaluation runs back on the CPU."""
    if device == "cpu":
        return setup
    setup.model.to(device)
    batches, evaluate = setup.batches, setup.evaluate

    def moved() -> Iterator[tuple[Any, Any]]:
        for x, y in batches():
            yield _to(x, device), _to(y, device)

    def evaluate_on_cpu(model: nn.Module) -> float:
        return evaluate(model.to("cpu"))

    setup.batches, setup.evaluate = moved, evaluate_on_cpu
    if setup.scaler is not None:
        setup.scaler = torch.amp.GradScaler(device, init_scale=setup.scaler.get_scale(),
                                            growth_interval=setup.scaler.get_growth_interval())
    setup.guard_kwargs = dict(setup.guard_kwargs)
    return setup


def train(setup: Setup, mode: str = "bare", *, remedy: Any = None,
          guard_factory: Callable[[Setup], Any] | None = None, device: str = "cpu") -> RunResult:
    """Run ``setup`` for ``setup.steps`` steps.

    mode "bare": plain ``optimizer.step()``. mode "guarded": ``guard_factory(setup)`` builds a
    Guard and ``guard.step(loss)`` replaces the optimizer step. Any other mode needs
    ``remedy(setup, model, optimizer)`` -> callable run after backward and before the step
    (a baseline such as fixed clipping), returning False to skip the step.
    """
    setup = on_device(setup, device)
    model, opt = setup.model, setup.optimizer
    guard = guard_factory(setup) if mode == "guarded" else None
    losses: list[float] = []
    err = None
    finished = True
    t0 = time.perf_counter()
    it = setup.batches()
    try:
        for _ in range(setup.steps):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            if setup.autocast is not None:
                with torch.autocast(device.split(":")[0], dtype=setup.autocast):
                    out = setup.forward(model, x) if setup.forward else model(x)
                    loss = setup.loss_fn(out, y)
            else:
                out = setup.forward(model, x) if setup.forward else model(x)
                loss = setup.loss_fn(out, y)
            if setup.scaler is not None:
                setup.scaler.scale(loss).backward()
            else:
                loss.backward()
            lv = float(loss.detach())
            losses.append(lv)
            applied = True
            if guard is not None:
                applied = guard.step(loss)
            else:
                if remedy is not None and remedy(lv) is False:
                    applied = False
                    if setup.scaler is not None:
                        setup.scaler.update()
                elif setup.scaler is not None:
                    setup.scaler.step(opt)
                    setup.scaler.update()
                else:
                    opt.step()
            if setup.scheduler is not None:
                if setup.scheduler_kind == "plateau":
                    setup.scheduler.step(lv if math.isfinite(lv) else float("inf"))
                elif applied:
                    setup.scheduler.step()
    except Exception as e:  # noqa: BLE001 - a crash is an outcome to score
        finished = False
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    seconds = time.perf_counter() - t0
    try:
        with torch.no_grad():
            metric = float(setup.evaluate(model))
    except Exception:  # noqa: BLE001
        metric = math.nan
    if guard is not None:
        guard.close()
    return RunResult(mode=mode, losses=losses, metric=metric, seconds=seconds, finished=finished,
                     error=err, findings=list(guard.findings) if guard else [],
                     actions=list(guard.actions) if guard else [], guard=guard)
