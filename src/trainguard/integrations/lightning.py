"""PyTorch Lightning 2.x: ``GuardCallback``, the Guard as a callback.

    from trainguard.integrations.lightning import GuardCallback
    guard_cb = GuardCallback()                      # any tg.Guard keyword: policy=, clip=, log=, ...
    trainer = L.Trainer(callbacks=[guard_cb], gradient_clip_val=1.0, precision="16-mixed")
    trainer.fit(model, loader)
    print(guard_cb.guard.summary())

How it reaches the update (Lightning runs the backward pass *inside* ``optimizer.step(closure)``,
so no callback hook can veto a step): at ``on_fit_start`` the callback wraps the ``step`` of the
raw torch optimizer Lightning drives (an instance attribute; removed at the end of fit). Then,
per optimizer step:

1. ``on_before_backward`` collects each micro-batch's loss (Lightning has already divided it by
   ``accumulate_grad_batches``; their sum is the window's mean loss);
2. ``on_before_optimizer_step`` (after the fp16 unscale, before Lightning's
   ``gradient_clip_val`` clipping) measures, detects and repairs: ``Guard.decide_step``;
3. the wrapped ``step`` applies the update at the Guard's LR scale, or does not (a true skip:
   parameters, moments and step counters untouched).

Works with automatic and manual optimization, ``accumulate_grad_batches``, ``"16-mixed"`` (the
precision plugin's GradScaler keeps its protocol; its own overflow skips are events, not
findings), ``"bf16-mixed"`` and DDP (the Guard all-reduces its statistics, so every rank takes
the same decision). Findings and actions are logged to the trainer's loggers as
``trainguard/...`` counters; a halt raises :class:`trainguard.TrainingUnstable` with the story
out of ``trainer.fit``; ModelCheckpoint's saves (and its rotation of old files) wait while
``guard.healthy`` is False, and any other checkpoint is refused while the weights are non-finite.

Several optimizers (Lightning's GAN recipe: manual optimization, ``opt_g`` and ``opt_d`` stepped
in turn): when each optimizer trains exactly the parameters of one submodule (``self.G``,
``self.D``), each gets its own Guard on that submodule, a *player*, as two Guards would in a
plain loop (``callback.guards``, ``callback.players``; ``callback.guard`` is the first). Each
player sees the losses of the backward passes made since the last optimizer step (its own), its
rollbacks restore its own weights and optimizer state (a player stepped right after another, on
the same backward pass, judges that pass's loss), and its loss-progress rules are off from
the start (the players' losses are coupled and need not go down; ``judge_loss=True`` keeps
them). ``log=``, ``report=``, ``checkpoint_dir=`` and ``locate_dir=`` get the player's name
(``run.jsonl`` -> ``run.G.jsonl``), the loggers' counters read ``trainguard/G/finding/...``. When
the optimizers do not split the module that way, the first one is guarded (with a warning) and
the others step unguarded.

Not supported: ``Guard(sync=False)`` (the update is Lightning's), DeepSpeed and other strategies
that step inside ``backward`` (use ``GuardCallback(observe=True)``: measure, detect, report, never
act).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ImportError as e:
        raise ImportError("trainguard.integrations.lightning needs Lightning 2.x: "
                          "pip install 'trainguard[lightning]'") from e

from ..guard import Guard
from ..remedies.executor import ReuseFirst
from . import check_adapter_options
from ..sinks.base import Sink
from ..types import Action, Finding

_MAJOR = int(pl.__version__.split(".")[0])
if _MAJOR != 2:  # pragma: no cover
    raise ImportError(f"trainguard.integrations.lightning supports Lightning 2.x, found "
                      f"{pl.__version__}")


class _LoggerSink(Sink):
    """Findings and actions as counters on the trainer's loggers (``prefix``: a player's)."""

    def __init__(self, trainer: Any, prefix: str = "trainguard") -> None:
        self.trainer = trainer
        self.prefix = prefix
        self.n: dict[str, int] = {}

    def _log(self, key: str, step: int) -> None:
        self.n[key] = self.n.get(key, 0) + 1
        for lg in getattr(self.trainer, "loggers", ()):
            try:
                lg.log_metrics({key: float(self.n[key])}, step=step)
            except Exception:  # noqa: BLE001 - a logger must never break training
                pass

    def on_finding(self, f: Finding) -> None:
        self._log(f"{self.prefix}/finding/{f.kind}", f.step)

    def on_action(self, a: Action) -> None:
        self._log(f"{self.prefix}/action/{a.kind}", a.step)


#: the ``coupled_losses`` message of a LightningModule with several optimizers
MANY_OPTIMIZERS = (
    "several optimizers: each player (a GAN's generator and discriminator, stepped in turn) has "
    "a loss coupled to the other's that need not go down, so the rules that judge the loss's "
    "progress (plateau, slow divergence, ruin) are off; non-finite values, loss spikes, a 1e4x "
    "blow-up and gradient explosions are still judged. judge_loss=True keeps the progress "
    "rules on")

#: Guard options that name a file or folder: each player gets its own (its name added)
PLAYER_PATHS = ("log", "report", "checkpoint_dir", "locate_dir")


def find_players(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
                 ) -> list[tuple[str, torch.nn.Module]] | None:
    """For each optimizer, the submodule of ``module`` whose parameters are exactly the
    optimizer's (the shallowest such, so the name the module gave it: ``"G"``, not
    ``"G.0"``); None when some optimizer has none, or two share one."""
    found: list[tuple[str, torch.nn.Module]] = []
    for opt in optimizers:
        mine = {id(p) for g in opt.param_groups for p in g["params"]}
        hit = None
        for name, sub in module.named_modules():
            if not name:
                continue  # the whole module is no player
            ids = {id(p) for p in sub.parameters()}
            if ids == mine:
                hit = (name, sub)
                break
        if hit is None or any(hit[1] is m for _, m in found):
            return None
        found.append(hit)
    return found


def player_options(options: dict[str, Any], name: str) -> dict[str, Any]:
    """``options`` with each path of :data:`PLAYER_PATHS` made the player's own:
    ``run.jsonl`` -> ``run.G.jsonl``, ``ckpt/`` -> ``ckpt/G``."""
    out = dict(options)
    for key in PLAYER_PATHS:
        v = out.get(key)
        if v is None:
            continue
        v = os.fspath(v)
        if key.endswith("_dir"):
            out[key] = os.path.join(v, name)
        else:
            root, ext = os.path.splitext(v)
            out[key] = f"{root}.{name}{ext}"
    return out


class _Shared(Sink):
    """A user's sink as a further player sees it: its findings, actions and events reach the
    sink; its per-step statistics do not (they would interleave with the first player's under
    the same names) and closing it is the first player's."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def on_finding(self, finding: Finding) -> None:
        self.sink.on_finding(finding)

    def on_action(self, action: Action) -> None:
        self.sink.on_action(action)

    def on_event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        self.sink.on_event(kind, step, data)


class GuardCallback(Callback):
    """The Guard for a Lightning ``Trainer``.

    Args:
        observe: measure, detect and report only: never skip, clip, change the LR or roll back
            (``Guard.observe``); for strategies whose step the Guard cannot reach.
        **guard_options: :class:`trainguard.Guard` keywords (``policy``, ``clip``, ``log``,
            ``console``, ``snapshot_every``, ...). ``scaler`` is taken from the precision
            plugin; ``sync=False`` is refused.

    ``callback.guard`` is the Guard once training has started; with several optimizers that
    split the module into players, ``callback.guards`` holds one Guard per optimizer (in the
    order of ``configure_optimizers``) and ``callback.players`` their submodules' names.
    """

    def __init__(self, observe: bool = False, **guard_options: Any) -> None:
        super().__init__()
        check_adapter_options(guard_options, "GuardCallback",
                              "the trainer's precision plugin")
        self.observe = bool(observe)
        self.options = guard_options
        self.guard: Guard | None = None
        #: one Guard per guarded optimizer (one, unless the module has players)
        self.guards: list[Guard] = []
        #: the players' submodule names (empty: one Guard on the whole module)
        self.players: list[str] = []
        self._opts: list[torch.optim.Optimizer] = []  # the guarded raw optimizers
        self._orig_steps: list[Any] = []
        self._own_attrs: list[Any] = []
        self._losses: list[torch.Tensor] = []
        self._last_loss: torch.Tensor | None = None
        self._in_step = False  # inside the optimizer's own step (LBFGS's further evaluations)
        self._go: bool | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- set-up and tear-down ---------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        opts = [getattr(o, "_optimizer", o) for o in trainer.optimizers]  # LightningOptimizer
        if not opts:
            raise ValueError("GuardCallback: the LightningModule configured no optimizer")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        options = dict(self.options)
        options.setdefault("console", trainer.is_global_zero)
        players = find_players(pl_module, opts) if len(opts) > 1 else None
        if len(opts) > 1 and players is None:
            warnings.warn("trainguard: several optimizers that do not each train one submodule "
                          "(a GAN's self.G and self.D); only the first one is guarded",
                          RuntimeWarning, stacklevel=2)
            opts = opts[:1]
        self.guards, self.players = [], []
        if players is None:
            self.guards.append(Guard(pl_module, opts[0], scaler=scaler, **options))
            self.guards[0].core.sinks.append(_LoggerSink(trainer))
        else:
            user_sinks = list(options.pop("sinks", None) or ())
            for i, ((name, sub), opt) in enumerate(zip(players, opts)):
                mine = player_options(options, name)
                mine["sinks"] = user_sinks if i == 0 else [_Shared(s) for s in user_sinks]
                g = Guard(sub, opt, scaler=scaler, **mine)
                g.core.sinks.append(_LoggerSink(trainer, f"trainguard/{name}"))
                self.guards.append(g)
                self.players.append(name)
        if len(trainer.optimizers) > 1:
            # a GAN's recipe (opt_g, opt_d stepped in turn by manual optimization): the
            # players' losses are coupled and need not go down, which the progress rules took
            # for a stall or progress lost (a Lightning GAN's Guard rolled the whole module
            # back): they rest, as for two Guards that take turns
            for g in self.guards:
                g.core.couple(MANY_OPTIMIZERS)
        self.guard = self.guards[0]
        self._opts = opts
        self._wrap_checkpointing(trainer)
        self._orig_steps, self._own_attrs = [], []
        if not self.observe:
            for i, opt in enumerate(opts):
                self._own_attrs.append(opt.__dict__.get("step"))
                self._orig_steps.append(opt.step)
                opt.step = self._step_of(i)  # type: ignore[method-assign]

    def _step_of(self, i: int) -> Any:
        def step(closure: Any = None, **kwargs: Any) -> Any:
            return self._guarded_step(closure, _player=i, **kwargs)
        return step

    def _healthy(self) -> bool:
        return all(g._closed or g.healthy for g in self.guards)

    def _wrap_checkpointing(self, trainer: Any) -> None:
        """Defer every ModelCheckpoint save (and the rotation that comes with it) while
        ``guard.healthy`` is False (any player's), so a NaN run never rotates the last good
        checkpoint away. The save and its rotation are ModelCheckpoint's
        ``_save_topk_checkpoint`` / ``_save_last_checkpoint`` (Lightning 2.x); the state is
        read only when one is due."""
        self._wrapped: list[tuple[Any, str]] = []
        for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
            for name in ("_save_topk_checkpoint", "_save_last_checkpoint"):
                orig = getattr(cb, name, None)
                if orig is None or name in cb.__dict__:
                    continue

                def save(trainer: Any, monitor_candidates: Any, _orig: Any = orig) -> None:
                    if not self.guards or self._healthy():
                        _orig(trainer, monitor_candidates)
                    else:
                        for g in self.guards:
                            if not (g._closed or g.healthy):
                                g.core.event(
                                    "checkpoint_deferred", message="state unhealthy: "
                                    "ModelCheckpoint save deferred (last good step "
                                    f"{g.last_good_step})")
                setattr(cb, name, save)
                self._wrapped.append((cb, name))

    def _restore(self) -> None:
        for cb, name in getattr(self, "_wrapped", []):
            cb.__dict__.pop(name, None)
        self._wrapped = []
        for opt, own in zip(self._opts, self._own_attrs):
            if own is not None:  # a scheduler's counting wrapper, say
                opt.step = own  # type: ignore[method-assign]
            else:
                opt.__dict__.pop("step", None)  # back to the class's method
        self._orig_steps, self._own_attrs = [], []

    def _close(self) -> None:
        # the first player last: it closes the user's sinks, which the others share
        for g in reversed(self.guards):
            if not g._closed:
                g.close()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore()
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()
        self._close()

    # -- the step ---------------------------------------------------------------------------
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self._in_step:
            return  # LBFGS evaluating its closure again inside the step: not a new batch
        self._losses.append(loss.detach().reshape(()).float())

    def _window_loss(self) -> torch.Tensor | None:
        losses, self._losses = self._losses, []
        if not losses:
            return None
        return torch.stack(losses).sum()

    def _player_of(self, optimizer: Any) -> int | None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        for i, o in enumerate(self._opts):
            if o is raw:
                return i
        return None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self.guards or self._in_step:
            return
        # the losses of the backward passes since the last optimizer step are this step's;
        # a player stepped after another on the same backward pass judges that pass's loss
        loss = self._window_loss()
        if loss is None and self.players:
            loss = self._last_loss
        self._last_loss = loss
        i = self._player_of(optimizer)
        if i is None:
            return  # an optimizer left unguarded: its losses are not the guarded one's
        if self.observe:
            self.guards[i].observe(loss)
            return
        self._go = self.guards[i].decide_step(loss)

    def _guarded_step(self, closure: Any = None, _player: int = 0, **kwargs: Any) -> Any:
        """The raw optimizer's step as Lightning calls it (with its closure, or from the fp16
        scaler without one)."""
        out = None
        if closure is not None:
            out = closure()  # training_step, backward, on_before_optimizer_step, clipping
        guard, orig = self.guards[_player], self._orig_steps[_player]
        go, self._go = self._go, None
        if go is None:  # the hook did not run (a custom loop): decide here, after any clipping
            go = guard.decide_step(self._window_loss())
        if go:
            with guard.applying():
                if closure is not None and guard.executor.needs_closure:
                    # LBFGS: its first evaluation is the one just measured; the others rerun
                    # Lightning's closure (training_step, backward and this callback's hooks,
                    # which sit them out: they are the step's line search, not new steps)
                    self._in_step = True
                    try:
                        orig(ReuseFirst(out, closure), **kwargs)
                    finally:
                        self._in_step = False
                else:
                    orig(**kwargs)
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"trainguard: refusing to write a checkpoint while weights are "
                               f"non-finite ({', '.join(bad[:3])}); the Guard rolls back or halts "
                               "before such weights are trained on")
        if self.players:
            checkpoint["trainguard_players"] = {
                name: g.state_dict() for name, g in zip(self.players, self.guards)}
        elif self.guard is not None:
            checkpoint["trainguard"] = self.guard.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        players = checkpoint.get("trainguard_players")
        self._pending_state = ({"players": players} if players is not None
                               else checkpoint.get("trainguard"))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        state = getattr(self, "_pending_state", None)
        if state is None or not self.guards:
            return
        self._pending_state = None
        if self.players:
            saved = state.get("players")
            if not isinstance(saved, dict):
                warnings.warn("trainguard: the checkpoint holds one Guard's state, this run has "
                              f"players {self.players}: their detectors start fresh",
                              RuntimeWarning, stacklevel=2)
                return
            for name, g in zip(self.players, self.guards):
                if name in saved:
                    g.load_state_dict(saved[name])
        elif "players" in state:
            warnings.warn("trainguard: the checkpoint holds the states of players "
                          f"{sorted(state['players'])}, this run has one Guard: it starts fresh",
                          RuntimeWarning, stacklevel=2)
        else:
            self.guards[0].load_state_dict(state)


__all__ = ["GuardCallback", "find_players"]
