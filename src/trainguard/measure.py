"""The torch side's measurement of one step: gradients, parameters, optimizer state, normalisation
buffers, the GradScaler's verdict and the sampled activations in one device vector, turned into a
:class:`StepStats` record; and the post-update statistics of sampled steps (update-to-weight
ratios, Adam's epsilon dominance, 16-bit swamping).

``StepProbe`` owns the fused norm probe (:class:`~trainguard.stats.Probe`), the activation sampler
(and its cadence) and the BatchNorm running-statistics copy. It decides nothing.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import torch
from torch import nn

from .remedies.buffers import RunningStats
from .stats import ActivationSampler, Probe, _local, build_stats, optimizer_kind, quick_stats
from .types import StepStats

#: A module whose weights' norm exceeds this is corrupted even though finite. No trained layer
#: comes near it (weight norms of real models are O(1)-O(1e3); fp16's largest value is 65504),
#: while a flipped exponent bit turns an ordinary weight into ~1e38 and a runaway update leaves
#: 1e20-1e37 (the fault campaign, bench/faults.py): 1e15 sits orders of magnitude from both.
HUGE_WEIGHT = 1e15
#: Optimizer state whose norm exceeds this is corrupted: Adam's exp_avg_sq would need gradients
#: of ~3e7 sustained, a momentum buffer gradients of 1e14, Adagrad's sum 1e12 steps of |g| = 1e3.
#: An exponent bit flip leaves 1e26-1e38 (bench/faults.py), a weight frozen by it forever.
HUGE_STATE = 1e15


def scaler_enabled(scaler: Any) -> bool:
    return scaler is not None and bool(getattr(scaler, "is_enabled", lambda: True)())


def scaler_stage_ready(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """True when the scaler has not unscaled this optimizer's gradients yet."""
    states = getattr(scaler, "_per_optimizer_states", None)
    stage = states[id(optimizer)]["stage"] if states is not None else None
    return stage is None or getattr(stage, "name", "") == "READY"


#: Optimizer state that divides the update (Adam's ``exp_avg_sq``, AMSGrad's maximum, RMSprop's
#: ``square_avg``, Adagrad's ``sum``, Adamax's ``exp_inf``). +Inf or a huge value there makes the
#: coordinate's update 0: the weight freezes and nothing downstream ever shows it, so these are
#: read on their own rolling cadence (issue #12). Numerator state (momentum, ``exp_avg``) needs no
#: such read: a bad value there reaches the weight in the same step's update, and the weights are
#: checked every step.
DENOMINATOR_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf"})
#: each denominator tensor is read every this many steps (a rolling share of them per step): a
#: corruption is seen at the step it happens or the next — "within one step", what the fault
#: campaign (bench/faults.py) asks — at half the cost of reading all of them every step.
DENOMINATOR_EVERY = 2


#: the sampled optimizer-state fractions read at most this many coordinates of a tensor (a
#: strided sample: fractions, not sums; the full 0.6M coordinates of a 64-512x3 MLP cost ~5 ms
#: per sampled step on one CPU thread)
SAMPLE_COORDS = 65536


def _sample(t: torch.Tensor) -> torch.Tensor:
    """At most :data:`SAMPLE_COORDS` evenly strided coordinates of ``t`` (a view when possible)."""
    flat = t.reshape(-1)
    n = flat.numel()
    return flat[::n // SAMPLE_COORDS] if n > 2 * SAMPLE_COORDS else flat


class StepProbe:
    """Measures steps of ``model`` trained by ``optimizer`` (see the module docstring).

    Args:
        sample_every: activation probes and post-update statistics on the first step and every
            this many steps (every ``sample_every // 10`` during a close watch).
        param_norm_every: parameter norms, optimizer-state norms and buffer checks every this
            many steps (and at once on a non-finite step).
        check_weights: judge every weight every step and the update's divisor state in
            rolling halves (``Guard(integrity="step")``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, *,
                 sharded: bool, process_group: Any, sample_every: int,
                 param_norm_every: int, check_weights: bool = False) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.probe = Probe(model, optimizer, sharded=sharded, process_group=process_group)
        self.sampler = ActivationSampler(model)
        self.running = RunningStats(model)  # BatchNorm statistics a skipped batch must not keep
        self.sample_every = sample_every
        self.param_norm_every = param_norm_every
        self.watch_until = -1  # close watch (frequent probes) after a rollback
        self.opt_kind = optimizer_kind(optimizer)
        self.post: dict[str, float] | None = None  # optimizer-state stats of the last sampled update
        #: ids of 16-bit parameters the Guard keeps fp32 master weights for (not judged for
        #: swamping: their updates accumulate in the master)
        self.mastered: set[int] = set()
        self._group_of = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
        self._state_owner: list[int] = []
        self.force_params = False  # read parameters etc. at the next step whatever the cadence
        #: the weights' norms are read every step (in the gradients' fused norm call) and judged
        #: for NaN/Inf or > HUGE_WEIGHT; they are *reported* (StepStats.param_norms) on the
        #: ``param_norm_every`` cadence or when bad (issue #12, item 4)
        self.check_weights = check_weights  # Guard(integrity="step")
        self._denoms: list[list[torch.Tensor]] = []  # DENOMINATOR_EVERY rolling shares
        self._denom_owner: list[list[int]] = []
        self._denom_key: tuple[int, int] | None = None
        self._layout_key: tuple | None = None  # optimizer_state_tensors' cached layout
        self._layout: list[tuple[int, str]] = []
        self.sampler.arm()  # the first forward is probed

    def rebind(self) -> None:
        """The optimizer's parameters were replaced in place (a structural repair swapped a
        module): forget what was keyed on the old ones."""
        self._group_of = {id(p): grp for grp in self.optimizer.param_groups for p in grp["params"]}
        self._denom_key = None
        self._layout_key = None
        self._state_owner = []
        self.post = None

    # -- cadence ----------------------------------------------------------------------------
    def arm_if_due(self, step: int) -> None:
        """``step`` is the number of the next step."""
        every = self.sample_every
        if step <= self.watch_until:
            every = max(1, every // 10)
        if step % every == 0:
            self.sampler.arm()

    def watch(self, step: int) -> None:
        """After a rollback: probe the restored weights at once, then often for a while."""
        self.sampler.arm()
        self.watch_until = step + self.sample_every

    def with_params(self, step: int) -> bool:
        return step % self.param_norm_every == 0

    def agree(self, ok: bool) -> bool:
        """``ok`` on every rank (a MIN all-reduce when distributed; the same flag otherwise)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or self.probe._world() == 1:
            return ok
        t = torch.tensor([1.0 if ok else 0.0], device=self.probe.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.probe.process_group)
        return bool(t.item() > 0)

    # -- the step's vector --------------------------------------------------------------------
    def extra_tensors(self, scaled: bool, buffers: bool = False, running: bool = False,
                      denominators: int | None = None) -> tuple[list[torch.Tensor], list[str], dict]:
        """``buffers``: optimizer-state norms (parameter cadence); ``running``: the
        normalisation layers' running statistics (a few small tensors: every step in the
        default mode, so a batch that poisons them is caught, and skipped, at its own step)."""
        sampler = self.sampler
        if not (buffers or scaled or denominators is not None or sampler._handles
                or sampler.results or sampler.hookless_armed):
            # a plain step: at most the running statistics
            if running and self.running.floats:
                return ([self.running.norms()], ["__buffers__"],
                        {"__buffers__": len(self.running.floats)})
            return [], [], {}
        extra: list[torch.Tensor] = []
        names: list[str] = []
        n_buf = {}
        if (buffers or running) and self.running:
            extra.append(self.running.norms())
            names.append("__buffers__")
            n_buf = {"__buffers__": len(self.running.floats)}
        if buffers:
            self._denom_key = None  # the rolling split is rebuilt after each full read
            state, self._state_owner = self.optimizer_state_tensors()
            if state:
                # state already in the norms' dtype: no dtype argument (it takes a slower
                # path on CPU); 16-bit state is accumulated in fp32 (its norm overflows fp16)
                nd = self.probe.norm_dtype
                kw = {} if all(t.dtype is nd for t in state) else {"dtype": nd}
                with torch.no_grad():
                    extra.append(torch.stack(torch._foreach_norm(state, 2, **kw)))
                names.append("__optstate__")
                n_buf["__optstate__"] = len(state)
        elif denominators is not None:
            share = self.denominator_share(denominators)
            if share:
                # state already in the norms' dtype: no dtype argument (it takes a slower
                # path on CPU); 16-bit state is accumulated in fp32 (its norm overflows fp16)
                nd = self.probe.norm_dtype
                kw = {} if all(t.dtype is nd for t in share) else {"dtype": nd}
                with torch.no_grad():
                    extra.append(torch.stack(torch._foreach_norm(share, 2, **kw)))
                names.append("__optstate__")
                n_buf["__optstate__"] = len(share)
        if scaled and getattr(self.scaler, "_scale", None) is not None:
            extra.append(self.scaler._scale.detach().float().reshape(1))
            names.append("__scale__")
        found = self.scaler_found_inf() if scaled else None
        if found is not None:
            extra.append(found)
            names.append("__found_inf__")
        acts = self.sampler.collect()
        kinds: dict[str, Any] = dict(n_buf)
        if len(acts):
            if acts.values is not None:
                extra.append(acts.values)
            names.append("__activations__")
            kinds["__activations__"] = acts
        return extra, names, kinds

    def optimizer_state_tensors(self) -> tuple[list[torch.Tensor], list[int]]:
        """Floating-point optimizer state shaped like its parameter (moments, square averages,
        momentum buffers), with the index of the parameter each belongs to. Read on the
        parameter-norm cadence: Inf in Adam's exp_avg_sq freezes a weight silently (issue #12,
        item 3). Which entries those are is worked out again only when the state dict is
        replaced or an entry appears or goes (its layout key); the tensors themselves are looked
        up every time, so one swapped in place of another is read."""
        state = self.optimizer.state
        params = self.probe.params
        key = (id(state), len(state), [len(st) if (st := state.get(p)) else 0 for p in params])
        if key != self._layout_key:
            self._layout_key = key
            self._layout = [(i, name) for i, p in enumerate(params) if (st := state.get(p))
                            for name, v in st.items()
                            if (isinstance(v, torch.Tensor) and v.is_floating_point()
                                and v.dim() > 0 and v.numel() == p.numel())]
        out: list[torch.Tensor] = []
        local = _local if self.probe.sharded else None
        for i, name in self._layout:
            st = state.get(params[i])
            v = st.get(name) if st else None
            if not isinstance(v, torch.Tensor):  # gone or replaced by something else: look again
                self._layout_key = None
                return self.optimizer_state_tensors()
            out.append(local(v) if local else v)
        return out, [i for i, _ in self._layout]

    def denominator_share(self, step: int) -> list[torch.Tensor]:
        """The denominator state tensors read at ``step`` (:data:`DENOMINATOR_STATE`, one
        rolling share of :data:`DENOMINATOR_EVERY`); ``self._state_owner`` names their
        parameters. The split is rebuilt when the optimizer's state dict is replaced or changes
        size (a load, a rollback, lazily created state) and after every full read on the
        ``param_norm_every`` cadence (a state tensor swapped in place of another is followed
        within that many steps)."""
        state = self.optimizer.state
        key = (id(state), len(state))
        if key != self._denom_key:
            self._denom_key = key
            self._denoms = [[] for _ in range(DENOMINATOR_EVERY)]
            self._denom_owner = [[] for _ in range(DENOMINATOR_EVERY)]
            k = 0
            for i, p in enumerate(self.probe.params):
                st = state.get(p)
                if not st:
                    continue
                for name, v in st.items():
                    if (name in DENOMINATOR_STATE and isinstance(v, torch.Tensor)
                            and v.is_floating_point() and v.dim() > 0 and v.numel() == p.numel()):
                        self._denoms[k % DENOMINATOR_EVERY].append(_local(v.detach()))
                        self._denom_owner[k % DENOMINATOR_EVERY].append(i)
                        k += 1
        share = step % DENOMINATOR_EVERY
        self._state_owner = self._denom_owner[share]
        return self._denoms[share]

    def scaler_found_inf(self) -> torch.Tensor | None:
        """The scaler's own verdict after ``unscale_`` (the inf/NaN count it will skip the
        step on), as a 1-element tensor for the step's one transfer; None when the scaler
        keeps no such state (then the verdict is inferred from the gradient norms)."""
        states = getattr(self.scaler, "_per_optimizer_states", None)
        st = states.get(id(self.optimizer)) if isinstance(states, dict) else None
        found = st.get("found_inf_per_device") if isinstance(st, dict) else None
        if not found:
            return None
        dev = self.probe.device
        return torch.stack([t.detach().to(dev, torch.float32).reshape(()) for t in found.values()]
                           ).sum().reshape(1)

    @staticmethod
    def unpack_extra(vals: np.ndarray, names: list[str], kinds: dict) -> tuple[float | None, dict | None]:
        scale = None
        acts: dict[str, dict] = {}
        i = 0
        for n in names:
            if n == "__scale__":
                scale = float(vals[i])
                i += 1
                continue
            if n == "__found_inf__":
                acts["__found_inf__"] = {"value": float(vals[i])}
                i += 1
                continue
            if n in ("__buffers__", "__optstate__"):
                k = int(kinds[n])
                acts[n] = {"values": vals[i:i + k]}
                i += k
                continue
            if n == "__activations__":
                sampled = kinds[n]
                rows = sampled.rows
                for name, (kind, four) in sampled.unpack(vals[i:i + sampled.size]).items():
                    rec = StepProbe.activation_record(kind, *four)
                    if name in rows and rec.get("dead_fraction") is not None:
                        rec["rows"] = rows[name]
                    acts[name] = rec
                i += sampled.size
        return scale, (acts or None)

    @staticmethod
    def activation_record(kind: str, dead: float, sat: float, q: float, units: float) -> dict:
        """One sampled activation's entry of ``StepStats.activations``."""
        if kind == "recurrent":  # backward signal through time (first vs last step)
            return {"kind": "recurrent", "dead_fraction": None, "saturated_fraction": None,
                    "second_moment": None, "steps": int(units),
                    "time_grad_ratio": dead / sat if sat > 0 else math.nan}
        if kind == "logits":  # the model's output: mean log Z (detect.logits)
            return {"kind": "logits", "dead_fraction": None, "saturated_fraction": None,
                    "second_moment": None, "log_z": q, "units": int(units)}
        if kind == "softmax":  # attention: one-hot row fraction and max |logit|
            return {"kind": "softmax", "dead_fraction": None,
                    "saturated_fraction": None if math.isnan(sat) else sat,
                    "second_moment": None, "max_logit": q, "units": int(units)}
        return {"kind": kind, "dead_fraction": None if math.isnan(dead) else dead,
                "saturated_fraction": None if math.isnan(sat) else sat,
                "second_moment": q, "units": int(units)}

    #: the extra values the short path of :meth:`measure` reads (only finiteness and size are
    #: judged of them on a healthy step: anything else goes through the general path)
    QUICK_EXTRA = frozenset({"__buffers__", "__optstate__"})

    # -- the default mode: one transfer -------------------------------------------------------
    def measure(self, loss: torch.Tensor | float | None, step: int, *, scaled: bool,
                lr: float | None, divide: float | None = None,
                force_params: bool = False) -> tuple[StepStats, list]:
        """The step's statistics (one host transfer; rare extra reads on non-finite steps).
        ``divide``: the gradients are still multiplied by a loss scale (observe-only).
        ``force_params``: read parameters, optimizer state and buffers this step whatever the
        cadence (after a snapshot failed its check, and at close)."""
        known = loss is not None
        if loss is None:
            loss = math.nan
        # a compiled model's sampled step has no activation probes: still a sampled step
        # (update ratios, optimizer state), told by an empty activations record
        hookless = self.sampler.hookless_armed
        with_params = force_params or self.force_params or self.with_params(step)
        cadence = with_params
        self.force_params = False
        extra, names, kinds = self.extra_tensors(
            scaled, buffers=with_params, running=True,
            denominators=step if self.check_weights else None)
        probe = self.probe
        read = with_params or self.check_weights
        if read == with_params and not divide and probe._world_size == 1 and all(
                n in self.QUICK_EXTRA for n in names):
            # the common step (no sampled probe, no scaler state; on the parameter cadence,
            # the weights' and optimizer state's norms too): one transfer, then plain Python;
            # anything not finite or huge goes on to the general path
            vec, idx, _ = probe.measure_device(loss, with_params=with_params, extra=extra)
            host = vec.tolist()
            ng = len(idx)
            off = ng + (len(probe.params) if with_params else 0)
            rest = host[off:-1]  # running statistics, then optimizer-state norms, if any
            if all(math.isfinite(v) for v in rest) and not any(
                    v > HUGE_STATE for v in rest[kinds.get("__buffers__", 0):]):
                quick = quick_stats(step, probe, host[:ng], idx, host[-1],
                                    pn=host[ng:off] if with_params else None, lr=lr,
                                    optimizer=self.opt_kind, optimizer_state=self.post,
                                    loss_known=known)
                if quick is not None and not (quick.param_norm is not None
                                              and quick.param_norm > HUGE_WEIGHT):
                    self.post = None
                    if hookless:
                        quick.activations = {}
                    if cadence and "__buffers__" in kinds:
                        self.running.keep()  # verified: the copy a skip restores
                    return quick, probe.last_grads
            gn, idx, pn, ev, lv = probe.split(np.asarray(host, dtype=np.float64), idx,
                                              with_params)
        else:
            gn, idx, pn, ev, lv = probe.measure(loss, with_params=read, extra=extra)
        if read and not with_params and pn is not None:
            with np.errstate(invalid="ignore"):
                healthy = bool(np.isfinite(pn).all()) and not bool((pn > HUGE_WEIGHT).any())
            if healthy:
                pn = None  # judged fine; reported on the cadence only
            else:
                with_params = True  # a weight went bad between cadence reads: report it now
        scale, acts = self.unpack_extra(ev, names, kinds)
        found = acts.pop("__found_inf__", None) if acts else None
        bufs = acts.pop("__buffers__", None) if acts else None
        ost = acts.pop("__optstate__", None) if acts else None
        logits = acts.pop("(output)", None) if acts else None
        if acts is not None and not acts:
            acts = None
        if not np.isfinite(gn).all():
            # rare path: a norm that overflowed fp32 (finite values ~1e20 square past 3.4e38)
            # is not a non-finite gradient; fp64 tells them apart
            gn = probe.exact_grad_norms(gn)
        if divide:
            gn = gn / divide
        stats = build_stats(step, probe, gn, idx, pn, float(lv[0]), lr=lr, loss_scale=scale,
                            activations=acts, optimizer=self.opt_kind, optimizer_state=self.post)
        stats.output_log_z = logits["log_z"] if logits else None
        stats.loss_known = known
        if hookless and stats.activations is None:
            stats.activations = {}
        self.post = None
        if found is not None:
            # the scaler's own verdict: it skips exactly when it found inf/NaN (issue #12: a
            # norm overflow was taken for a scaler skip, the scaler applied the update, and
            # guard.step returned False)
            stats.scaler_overflow = found["value"] > 0 and stats.loss_finite and stats.params_finite
        elif scaled and not stats.grads_finite and stats.loss_finite and stats.params_finite:
            stats.scaler_overflow = True
        if not with_params and not (stats.loss_finite and stats.grads_finite):
            # something is non-finite: measure the parameters now (rare, off the healthy path)
            # so that corrupted weights are named at once
            _, _, pn_now, _, _ = probe.measure(0.0, with_params=True)
            assert pn_now is not None
            with np.errstate(over="ignore", invalid="ignore"):
                stats.param_norms = probe.group_norms(pn_now, probe._all_idx).tolist()
                stats.param_norm = float(np.sqrt(np.sum(np.square(pn_now))))
            if self.running:
                bufs = {"values": self.running.norms().cpu().numpy()}
        if stats.param_norms is not None and not stats.params_finite:
            # an fp32 norm overflows for finite weights of ~1e19: tell them from NaN/Inf
            pn64 = probe.exact_param_norms()
            g64 = probe.group_norms(pn64, probe._all_idx)
            with np.errstate(over="ignore", invalid="ignore"):
                huge = [m for m, a, b in zip(probe.modules, stats.param_norms, g64)
                        if not math.isfinite(a) and math.isfinite(b)]
            if huge:
                stats.huge_param_modules = huge
                stats.param_norms = g64.tolist()
                stats.param_norm = float(np.sqrt(np.sum(np.square(pn64))))
        elif stats.param_norms is not None and stats.param_norm is not None \
                and stats.param_norm > HUGE_WEIGHT:
            stats.huge_param_modules = [m for m, a in zip(probe.modules, stats.param_norms)
                                        if a > HUGE_WEIGHT]
        if ost is not None:
            with np.errstate(invalid="ignore"):
                bad = np.flatnonzero(~np.isfinite(ost["values"]) | (ost["values"] > HUGE_STATE))
            if len(bad):
                stats.nonfinite_optimizer_modules = sorted(
                    {probe.modules[probe.group[self._state_owner[i]]] for i in bad})
        if bufs is not None:
            ok = np.isfinite(bufs["values"])
            if ok.all():
                if cadence:
                    self.running.keep()  # verified: the copy a skip restores (on the cadence)
            else:
                stats.nonfinite_buffers = sorted({self.running.names[i] for i in np.flatnonzero(~ok)})
                self.running.restore()
        return stats, probe.last_grads

    # -- sync=False: the vector stays on the device --------------------------------------------
    def device_vector(self, loss: torch.Tensor | float | None, step: int, scaled: bool
                      ) -> tuple[torch.Tensor, Any, int, tuple]:
        """(vector, index, number of norms, what the host needs to read it later)."""
        known = loss is not None
        extra, names, kinds = self.extra_tensors(scaled)
        with_params = self.with_params(step)
        vec, idx, n_norms = self.probe.measure_device(math.nan if loss is None else loss,
                                                      with_params=with_params, extra=extra)
        return vec, idx, n_norms, (idx, with_params, names, kinds, scaled, known)

    def host_stats(self, step: int, host: np.ndarray, meta: tuple, lr: float | None) -> StepStats:
        idx, with_params, names, kinds, scaled, known = meta
        gn, idx, pn, ev, lv = self.probe.split(host, idx, with_params)
        scale, acts = self.unpack_extra(ev, names, kinds)
        logits = None
        if acts:
            acts.pop("__found_inf__", None)
            logits = acts.pop("(output)", None)
            acts = acts or None
        stats = build_stats(step, self.probe, gn, idx, pn, float(lv[0]), lr=lr,
                            loss_scale=scale, activations=acts, optimizer=self.opt_kind)
        stats.output_log_z = logits["log_z"] if logits else None
        stats.loss_known = known
        if scaled and not stats.grads_finite and stats.loss_finite and stats.params_finite:
            stats.scaler_overflow = True
        return stats

    # -- after the update (sampled steps) -------------------------------------------------------
    def before_update(self, stats: StepStats) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """On a sampled step: the parameters and a copy of them, to diff after the update."""
        if stats.activations is None:
            return None
        with torch.no_grad():  # the parameters themselves, no detached views; no graph
            params = [_local(p) for p in self.probe.params]
            return params, [p.clone() for p in params]

    def after_update(self, saved: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
                     stats: StepStats) -> None:
        """Update-to-weight ratios into ``stats``; optimizer-state statistics for the next
        step's record (``self.post``)."""
        if saved is None:
            return
        params, before = saved
        probe = self.probe
        with torch.no_grad():
            n = len(params)
            bnorm = torch._foreach_norm(before, 2, dtype=probe.norm_dtype)
            # the update, in place of the copy (before - after: the same norm and the same
            # zeros as after - before, without a second parameter-sized allocation)
            torch._foreach_sub_(before, params)
            diffs = before
            vt = torch.stack(list(torch._foreach_norm(diffs, 2, dtype=probe.norm_dtype)) + list(bnorm))
            v = probe._reduce(vt, n_norms=2 * n).cpu().numpy()
            dn, bn = v[:n], v[n:]
        idx = np.arange(len(dn))
        gd, gb = probe.group_norms(dn, idx), probe.group_norms(bn, idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(gb > 0, gd / gb, np.nan)
            stats.update_ratios = ratios.tolist()
        self.post = self._optimizer_state(params, diffs)
        known = [r for r in stats.update_ratios if r == r]  # not NaN
        if any(math.isfinite(r) for r in known):  # read by the next step's detectors (plateau)
            # np.nanmedian's value (the middle one, or the mean of the two middle ones) at a
            # thirtieth of its cost on a short list
            self.post = dict(self.post or {}, update_ratio=statistics.median(known))

    #: the sampled optimizer-state statistics read at most this many parameter tensors (the
    #: largest): fractions of coordinates, so the largest tensors carry them, and a model of
    #: 1,000 small tensors paid ~10 small ops per tensor (0.1 s per sampled step) without it
    STATE_TENSORS = 64

    def _state_subset(self) -> list[int]:
        if getattr(self, "_subset", None) is None:
            ps = self.probe.params
            order = sorted(range(len(ps)), key=lambda i: -_local(ps[i].detach()).numel())
            self._subset = sorted(order[:self.STATE_TENSORS])
        return self._subset

    @torch.no_grad()
    def _optimizer_state(self, params: list[torch.Tensor], diffs: list[torch.Tensor]) -> dict[str, float] | None:
        """On sampled steps: Adam's epsilon dominance and 16-bit update swamping (one transfer),
        over the :attr:`STATE_TENSORS` largest parameter tensors, four small reductions each;
        the step count is read once per parameter group (a CUDA step tensor read per parameter
        was a device sync each)."""
        parts: list[torch.Tensor] = []   # int64 counts, on each tensor's device
        sizes = [0.0, 0.0]               # coordinates read: 16-bit gradients, Adam second moments
        slots: list[int] = []            # which of the four sums each part adds to
        eps_val = None
        group_t: dict[int, float] = {}
        by_thr: dict[tuple, list[torch.Tensor]] = {}
        every = self.probe.params
        for i in self._state_subset():
            p, lp, d = every[i], params[i], diffs[i]
            g = p.grad
            if g is None:
                continue
            if lp.dtype in (torch.float16, torch.bfloat16) and id(p) not in self.mastered:
                gs, ds = _sample(_local(g)), _sample(d)
                nz = gs != 0
                # int32 counts (at most 2 x SAMPLE_COORDS a tensor): half the time of a bool
                # tensor's default int64 sum on a CPU, the same integers
                parts += [nz.sum(dtype=torch.int32), (nz & (ds == 0)).sum(dtype=torch.int32)]
                slots += [0, 1]
            st = self.optimizer.state.get(p, {})
            grp = self._group_of.get(id(p))
            v, step = st.get("exp_avg_sq"), st.get("step")
            if v is not None and step is not None and grp is not None and "eps" in grp and "betas" in grp:
                eps_val = float(grp["eps"])
                b2 = float(grp["betas"][1])
                if id(grp) not in group_t:
                    group_t[id(grp)] = float(step)
                t = group_t[id(grp)]
                # 0 < sqrt(v / bc) < eps  <=>  0 < v < eps^2 * bc (v >= 0: a running mean of
                # squares): comparisons in v's own dtype, no copy, no square root
                vl = _sample(_local(v))
                if vl.dtype not in (torch.float32, torch.float64):
                    vl = vl.float()  # eps^2 underflows in 16-bit
                thr = eps_val * eps_val * max(1 - b2 ** t, 1e-12)
                sizes[1] += vl.numel()
                by_thr.setdefault((thr, vl.device, vl.dtype), []).append(vl.reshape(-1))
        for (thr, _dev, _dt), vs in by_thr.items():
            # one concatenation per threshold (one per parameter group): two reductions in
            # all instead of two per tensor
            flat = torch.cat(vs) if len(vs) > 1 else vs[0]
            parts += [(flat == 0).sum(dtype=torch.int32), (flat < thr).sum(dtype=torch.int32)]
            slots += [2, 3]
        if not parts:
            return None
        dev = self.probe.device
        v_ = torch.stack([x.to(dev) for x in parts]).to(self.probe.norm_dtype)
        host = self.probe._reduce(v_, n_norms=0).cpu().numpy()
        c = np.zeros(4)
        np.add.at(c, np.asarray(slots), host)
        out: dict[str, float] = {}
        if c[0] > 0:
            out["swamped_fraction"] = float(c[1] / c[0])
        seen = sizes[1] - c[2]  # non-zero second moments
        if seen > 0:
            out["eps_dominated_fraction"] = float((c[3] - c[2]) / seen)
            out["eps"] = eps_val if eps_val is not None else math.nan
        return out or None
