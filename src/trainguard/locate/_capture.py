"""StepCapture: the cheap always-on half of locate.

Per step it keeps *references* (no copies) to what a replay needs: the model's inputs, the
autocast settings and grad mode, the CPU/CUDA RNG state when the model has training-time
randomness (a 5 KB CPU tensor; nothing otherwise), and the gradient that flowed into the
model's output tensors (a tensor hook on each output, so the backward can be replayed
without the loss function). Cost on a healthy step: one Python forward hook on the root
module (plus a forward pre-hook when the model has Dropout-like modules or pre-hooks of its
own) and one tensor hook per output (bench/locate_overhead.py).

Memory: the references live until ``release()`` at the end of ``guard.step``. Inputs are held
anyway by the training loop; the output gradient (batch x outputs, e.g. the logits' gradient)
is kept alive through the backward pass instead of being freed as the backward moves on.
Pass ``keep_output_grad=False`` to drop it (then backward-origin failures are replayed
forward-only and reported as not reproduced).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from ..hooks import foreign_hooks, register_private  # kept out of torch.save(model)
from ..types import Finding
from ._replay import (Location, _arg_path, nonfinite_params,
                      parameters_location, replay_step, replaying, tensor_leaves, unwrap)

_RANDOM_MODULES: tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)
#: the later forward passes of one step whose inputs are kept (references) for the replay: the
#: two views of a contrastive pair, a siamese or triplet network's 2-3 passes, a GAN
#: discriminator's real and fake batches, FixMatch's weak and strong augmentations
MORE_FORWARDS = 7


def _signature(t: torch.Tensor) -> tuple:
    """Storage identity of a tensor (``h.detach()`` shares its storage with ``h``)."""
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype,
                t.device)
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, sparse)
        return (id(t),)


def has_randomness(model: nn.Module) -> bool:
    """Modules with training-time randomness: the Dropout family, RReLU, and modules with a
    non-zero ``dropout`` probability attribute (MultiheadAttention, RNN/LSTM/GRU)."""
    for m in model.modules():
        if isinstance(m, _RANDOM_MODULES):
            return True
        p = getattr(m, "dropout", None)
        if isinstance(p, float) and p > 0:
            return True
    return False


def dist_rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover
        pass
    return 0


def _sharded(model: nn.Module) -> bool:
    if any(hasattr(p, "_local_tensor") for p in model.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return isinstance(model, FSDP)
    except Exception:  # pragma: no cover
        return False


class StepCapture:
    """Keeps what a replay of the current step needs and, on a non-finite finding, replays
    it to name where the first NaN/Inf came from.

    Args:
        model: the trained module (DDP / torch.compile wrappers are unwrapped for the replay;
            module paths are the user's, without ``module.``).
        optimizer: optional; adds its state to reproducer bundles and is needed for the
            ``optimizer`` origin: an update ran after the last healthy step and its state
            explains the non-finite weights (without it, non-finite weights are reported
            as ``parameters``).
        scaler: optional GradScaler (its state goes into the bundle manifest).
        bundle_dir: when given, a reproducer bundle is written there for each located
            failure (see :mod:`trainguard.locate`), at most ``max_bundles`` per capture.
        model_factory: ``"module:callable"`` that rebuilds the model, stored in bundles for
            ``trainguard replay``.
        rng: keep the RNG state each step: ``None`` (default) when the model has Dropout-like
            modules, ``True``/``False`` to force.
        keep_output_grad: keep the gradient flowing into the model outputs (default True).

    Protocol (what the Guard calls): the hooks capture the first forward with grad enabled
    after the last ``release()``; ``refine(finding, model, stats)`` on a non-finite finding
    (before ``optimizer.step()``); ``release()`` at the end of every step; ``remove()`` at
    the end.
    """

    def __init__(self, model: nn.Module, *, optimizer: Any = None, scaler: Any = None,
                 bundle_dir: str | os.PathLike | None = None, model_factory: str | None = None,
                 rng: bool | None = None, keep_output_grad: bool = True,
                 max_bundles: int = 5) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"StepCapture expects a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model_factory is not None and (not isinstance(model_factory, str) or ":" not in model_factory):
            raise ValueError(f"model_factory must be a 'module:callable' string, got {model_factory!r}")
        if isinstance(max_bundles, bool) or not isinstance(max_bundles, int) or max_bundles < 0:
            raise ValueError(f"max_bundles must be an integer >= 0, got {max_bundles!r}")
        self.model = model
        self.inner = unwrap(model)
        self.optimizer, self.scaler = optimizer, scaler
        self.bundle_dir = os.fspath(bundle_dir) if bundle_dir is not None else None
        self.model_factory = model_factory
        self.keep_output_grad = bool(keep_output_grad)
        self.max_bundles = max_bundles
        self.bundles: list[str] = []
        self.random = has_randomness(self.inner) if rng is None else bool(rng)
        self.on_cuda = any(p.is_cuda for p in self.inner.parameters())
        self._cuda = torch.cuda.is_available()
        self.sharded = _sharded(model)
        # One forward hook (with kwargs) takes the inputs and hooks the outputs. A pre-hook,
        # put first, takes the inputs instead when the RNG state must be read before the
        # forward (Dropout-like modules), or when other forward pre-hooks are on the model:
        # they may replace the inputs, and a replay calls the model, which runs them again,
        # so it must get the inputs as they were before them (one appearing later is seen
        # by the forward hook, which then adds the pre-hook from the next step on).
        self.pre_hook = False
        self._handles = [register_private(
            model, "_forward_hooks",
            lambda: model.register_forward_hook(self._on_forward, with_kwargs=True))]
        if self.random or foreign_hooks(model, "_forward_pre_hooks"):
            self._add_pre_hook()
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._on_update))
        #: storage signatures of this step's and the previous step's outputs
        self._outputs_now: set[tuple] = set()
        self._prev_outputs: set[tuple] = set()
        self._leaf_hooks: list[Any] = []  # hooks on leaf outputs, removed at release()
        self._clear()
        self._prev_healthy = False  # the previous step had a captured forward and no finding
        self._updated = False       # an optimizer step ran since the last release()

    # ------------------------------------------------------------------ hooks (hot path)
    def _clear(self) -> None:
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self.grads: list[torch.Tensor | None] = []
        #: (args, kwargs) of the step's later forward passes with gradients (at most
        #: MORE_FORWARDS): replayed, forward only, when the first one does not explain a failure
        self.more: list[tuple[tuple, dict]] = []
        self._autocast_raw: tuple | None = None
        self.rng: torch.Tensor | None = None
        self.cuda_rng: list | None = None
        self.training = True
        self.taken = False
        self._hooked = False
        self._refined = False

    def _add_pre_hook(self) -> None:
        model = self.model
        self.pre_hook = True
        self._handles.append(register_private(
            model, "_forward_pre_hooks",
            lambda: model.register_forward_pre_hook(self._on_pre, with_kwargs=True,
                                                    prepend=True)))

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        """Take the inputs (unless the pre-hook did) and hook the outputs."""
        if not self.taken:
            if not torch.is_grad_enabled():
                return None
            if module._forward_pre_hooks and not self.pre_hook:
                if foreign_hooks(module, "_forward_pre_hooks"):
                    self._add_pre_hook()  # this step's inputs may have been replaced already
            self._take(module, args, kwargs)
        elif (self._hooked and len(self.more) < MORE_FORWARDS and torch.is_grad_enabled()
              and not replaying()):
            self.more.append((args, kwargs))  # another pass of the same step (references)
        return self._on_post(module, args, out)

    def _on_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.taken or not torch.is_grad_enabled():
            return None
        self._take(module, args, kwargs)
        return None

    def _take(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.taken = True
        self.args, self.kwargs = args, kwargs
        # the raw settings (two C calls; a third pair on CUDA): the dict of
        # :func:`autocast_state` is built only when a replay or a bundle reads it
        self._autocast_raw = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                              *((torch.is_autocast_enabled("cuda"),
                                 torch.get_autocast_dtype("cuda")) if self._cuda else ()))
        self.training = module.training
        if self.random:
            self.rng = torch.get_rng_state()
            if self.on_cuda and torch.cuda.is_available():
                self.cuda_rng = torch.cuda.get_rng_state_all()

    @property
    def autocast(self) -> dict | None:
        """The captured step's autocast settings, as :func:`autocast_state` writes them."""
        raw = self._autocast_raw
        if raw is None:
            return None
        st: dict[str, Any] = {"cpu": [raw[0], str(raw[1])]}
        if len(raw) > 2:
            st["cuda"] = [raw[2], str(raw[3])]
        return st

    def _on_post(self, module: nn.Module, args: Any, out: Any) -> None:
        if not self.taken or self._hooked or not torch.is_grad_enabled():
            return None
        self._hooked = True
        leaves = tensor_leaves(out)
        # signatures of this step's outputs: a later input with the same storage is the
        # model's own output fed back (an RNN's hidden state), not the batch (issue #12, 10)
        self._outputs_now = {_signature(t) for _, t in leaves}
        self.grads = [None] * len(leaves)
        if self.keep_output_grad:
            for i, (_, t) in enumerate(leaves):
                if not t.requires_grad:
                    continue
                node = t.grad_fn
                if node is not None:
                    # a pre-hook on the output's autograd node: the gradient the node consumes
                    # (grad_outputs[output_nr], after any tensor hook), at a fraction of a
                    # tensor hook's cost per step (bench/host_time.py: capture hooks)
                    node.register_prehook(functools.partial(self._store_node_grad, i,
                                                            t.output_nr))
                else:  # a leaf returned as an output: its hook outlives the step, so it
                    # is removed at release() (they piled up on the parameter, one per step)
                    self._leaf_hooks.append(
                        t.register_hook(functools.partial(self._store_grad, i)))
        return None

    def _store_grad(self, i: int, g: torch.Tensor) -> None:
        if i < len(self.grads):
            self.grads[i] = g

    def _store_node_grad(self, i: int, nr: int, grad_outputs: tuple) -> None:
        if i < len(self.grads) and nr < len(grad_outputs):
            self.grads[i] = grad_outputs[nr]

    def _on_update(self, *_: Any) -> None:
        self._updated = True

    # ------------------------------------------------------------------ protocol
    def release(self) -> None:
        """End of a step: drop the references to this step's inputs and gradients."""
        self._prev_outputs = self._outputs_now
        self._outputs_now = set()
        for h in self._leaf_hooks:
            h.remove()
        self._leaf_hooks = []
        self._prev_healthy = self.taken and not self._refined
        self._updated = False
        self._clear()

    def remove(self) -> None:
        """Remove the hooks (Guard.close)."""
        for h in self._handles + self._leaf_hooks:
            h.remove()
        self._handles, self._leaf_hooks = [], []
        self._clear()

    def refine(self, finding: Finding, model: nn.Module | None = None, stats: Any = None) -> Finding:
        """Replay the failing step and return ``finding`` with ``where``, ``origin``,
        ``locations``, evidence and message filled in. Never raises: on an internal error
        the original finding comes back with ``evidence['locate_error']``."""
        self._refined = True
        try:
            loc = self.locate_step(stats)
        except Exception as e:  # locating must never break training
            ev = dict(finding.evidence)
            ev["locate_error"] = f"{type(e).__name__}: {e}"
            return Finding(kind=finding.kind, step=finding.step, message=finding.message,
                           where=finding.where, evidence=ev, severity=finding.severity,
                           locations=finding.locations, origin=finding.origin,
                           remedies=finding.remedies)
        rank = dist_rank()
        loc.evidence["rank"] = rank
        if _world() > 1:
            loc = _agree_across_ranks(loc, rank)
        if finding.origin == "parameters" and loc.origin not in ("parameters", "optimizer"):
            if _world() == 1:
                # single process: the detector saw weights whose norm is not finite in fp32
                # but whose values are (huge): its own message says what was seen (issue #12)
                return finding
            # the weights are non-finite on another rank (the Guard's norms are all-reduced):
            # keep the detector's origin so every rank takes the same decision (rollback)
            loc.origin = None
            loc.message = ("this rank's weights are finite; the non-finite weights are on "
                           "another rank")
        f = loc.as_finding(base=finding)
        if self.bundle_dir is not None and loc.found and len(self.bundles) < self.max_bundles \
                and "forward" not in loc.evidence:  # a bundle replays the first pass only
            try:
                path = self.write_bundle(loc, finding.step)
                self.bundles.append(path)
                f.evidence["bundle"] = path
                f.message += f" [reproducer: trainguard replay {path}]"
            except Exception as e:
                f.evidence["bundle_error"] = f"{type(e).__name__}: {e}"
        return f

    def locate_step(self, stats: Any = None) -> Location:
        """The Location of the captured step's first non-finite value."""
        bad = nonfinite_params(self.inner)
        if bad:
            by_optimizer = (self._prev_healthy and self._updated
                            and self._update_explains([n for n, _ in bad]))
            return parameters_location(bad, optimizer=by_optimizer)
        if not self.taken or self.args is None:
            return Location(None, "", "no forward pass with gradients was captured this step",
                            evidence={"reproduced": False})
        if self.sharded:
            return Location(None, "", "replay is not supported for sharded (FSDP) models; "
                            "parameters are finite", evidence={"reproduced": False})
        loss = getattr(stats, "loss", None)
        # under DDP the Guard's loss is averaged over ranks: another rank's NaN shows here,
        # so only this rank's replay (its output gradient) can blame the loss function
        loss = float(loss) if isinstance(loss, (int, float)) and _world() == 1 else None
        grads = self.grads if any(g is not None for g in self.grads) else None
        loc = replay_step(self.inner, self.args, self.kwargs or {}, grad_outputs=grads,
                          loss_value=loss, rng=self.rng, cuda_rng=self.cuda_rng,
                          autocast=self.autocast, grad_enabled=True)
        if loc.origin == "input":
            self._name_fed_back(loc)
        elif loc.origin in (None, "loss") and self.more:
            loc = self._locate_later_forwards(loc)
        return loc

    def _locate_later_forwards(self, first: Location) -> Location:
        """The step ran the model more than once and its first forward pass replayed finite:
        replay the later passes, forward only (their output gradients are not kept; with fresh
        dropout masks), and name the first one whose inputs or modules hold NaN/Inf. When they
        all stay finite, ``first`` comes back with a note: its "the loss function produced it"
        may be a later pass's backward."""
        n = 1 + len(self.more)
        for k, (args, kwargs) in enumerate(self.more, start=2):
            loc = replay_step(self.inner, args, kwargs or {}, autocast=self.autocast,
                              grad_enabled=True)
            if loc.origin in ("input", "forward"):
                loc.evidence.update(forward=k, forwards=n)
                loc.message = f"in forward pass {k} of {n} this step: {loc.message}"
                return loc
        first.evidence["forwards"] = n
        first.message += (f" (the model ran {n} times this step; the later passes replayed "
                          "finite, forward only)")
        return first

    def _name_fed_back(self, loc: Location) -> None:
        """An input that is the model's own output of the previous step (a recurrent hidden
        state fed back by the loop) is named as such, not as the batch: a skip cannot clean
        it, the loop must reset it (``Guard(on_reset=...)``)."""
        prev = self._prev_outputs
        if not prev:
            return
        for path, t in tensor_leaves((self.args or (), self.kwargs or {})):
            if _arg_path(path) == loc.where and _signature(t) in prev:
                loc.evidence["fed_back"] = True
                loc.message = (f"model input {loc.where} is the model's own output of the "
                               "previous step, fed back by the training loop (a recurrent "
                               "hidden state), and it holds NaN/Inf: a skipped step does not "
                               "clean it; reset it in Guard(on_reset=...) (e.g. re-initialise "
                               "the hidden state) or detach and re-create it each batch")
                loc.remedies = ("reset the fed-back state on a skip or rollback: "
                                "tg.Guard(model, opt, on_reset=lambda action: reset_hidden())",
                                "find the step that first made it non-finite (an exploding "
                                "recurrence: clip gradients, lower the LR)")
                return

    def _update_explains(self, names: list[str]) -> bool:
        """Positive evidence that the last update made the weights non-finite: the
        optimizer's state for a bad parameter is non-finite, or the update it implies
        (Adam-family m_hat / (sqrt(v_hat) + eps), SGD's momentum buffer) is. A weight that
        turned non-finite while its update was finite was written by something else."""
        if self.optimizer is None:
            return False
        params = dict(self.inner.named_parameters())
        groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        for n in names:
            p = params.get(n)
            st = self.optimizer.state.get(p) if p is not None else None
            if not st or p is None:
                continue
            with torch.no_grad():
                if any(isinstance(v, torch.Tensor) and v.is_floating_point()
                       and not bool(torch.isfinite(v).all()) for v in st.values()):
                    return True
                g = groups.get(id(p), {})
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
                if m is not None and v is not None and "step" in st:
                    b1, b2 = g.get("betas", (0.9, 0.999))
                    t = float(st["step"])
                    mh = m.float() / max(1 - b1 ** t, 1e-12)
                    vh = v.float() / max(1 - b2 ** t, 1e-12)
                    upd = g.get("lr", 1.0) * mh / (vh.sqrt() + g.get("eps", 1e-8))
                    if not bool(torch.isfinite(upd).all()):
                        return True
                    if bool((upd.abs() > torch.finfo(p.dtype).max / 2).any()):
                        return True  # a finite update that overflows the weight's dtype
                buf = st.get("momentum_buffer")
                if isinstance(buf, torch.Tensor) and not bool(
                        torch.isfinite(buf * g.get("lr", 1.0)).all()):
                    return True
        return False

    def write_bundle(self, loc: Location, step: int) -> str:
        from ._bundle import write_bundle
        return write_bundle(self.bundle_dir or ".", step=step, location=loc, model=self.inner,
                            args=tuple(self.args or ()), kwargs=dict(self.kwargs or {}),
                            grad_outputs=list(self.grads), rng=self.rng, cuda_rng=self.cuda_rng,
                            autocast=self.autocast, training=self.training, grad_enabled=True,
                            optimizer=self.optimizer, scaler=self.scaler,
                            model_factory=self.model_factory, rank=dist_rank())

    def __repr__(self) -> str:
        return (f"StepCapture(model={type(self.inner).__name__}, rng={self.random}, "
                f"bundle_dir={self.bundle_dir!r})")


def _agree_across_ranks(loc: Location, rank: int) -> Location:
    """Under DDP one rank's NaN reaches every rank's gradients through the all-reduce, and
    the Guard reaches ``refine`` on every rank at the same step (its statistics are
    all-reduced). Each rank replays locally; one ``all_gather_object`` of the small results
    lets every rank report the same location: the lowest rank whose replay found one."""
    mine = {"rank": rank, "origin": loc.origin, "where": loc.where, "message": loc.message,
            "locations": list(loc.locations)}
    try:
        import torch.distributed as dist
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    except Exception as e:  # fall back to this rank's own view
        loc.evidence["gather_error"] = f"{type(e).__name__}: {e}"
        gathered = [mine]
    found = [g for g in gathered if isinstance(g, dict) and g.get("origin") is not None]
    loc.evidence["ranks"] = [{k: g[k] for k in ("rank", "origin", "where")}
                             for g in gathered if isinstance(g, dict)]
    if not found:
        loc.message += (f" on every rank ({len(gathered)}): the non-finite values came from "
                        "outside the replayed forward/backward")
        return loc
    first = found[0]
    others = [g["rank"] for g in gathered if isinstance(g, dict) and g.get("origin") is None]
    msg = f"rank {first['rank']}: {first['message']}"
    if others:
        msg += (f" (the replay on rank(s) {', '.join(map(str, others))} is finite: their "
                "non-finite gradients came through DDP's all-reduce)")
    return Location(first["origin"], first["where"], msg, tuple(first["locations"]),
                    dict(loc.evidence, culprit_rank=first["rank"]))


def _world() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size())
    except Exception:  # pragma: no cover
        pass
    return 1


