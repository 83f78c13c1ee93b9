"""Which data a bad step trained on: the sample ids of its batch, and the rows to blame.

A loop that knows its batch's dataset indices (or row keys) hands them to the step::

    for idx, x, y in loader:                          # a Dataset that also returns its index
        per_row = loss_fn(model(x), y, reduction="none")
        loss = per_row.mean()
        loss.backward()
        guard.step(loss, sample_ids=idx, sample_losses=per_row)

On a healthy step nothing is read: the Guard holds the references until the step is decided
and drops them. On a step with a finding that a batch can cause (:data:`BATCH_KINDS`) the ids are
read once, the finding's evidence quotes them (``sample_ids``, ``suspect_ids``), a
:class:`BadBatch` joins ``guard.bad_batches`` and a ``bad_batch`` event goes to the sinks
(the JSONL log, the report). Per-sample losses, when given, name the rows: the non-finite ones,
or the few rows that carry most of the batch's excess loss. With gradient accumulation each
micro-batch is shown with :meth:`Guard.observe_loss` and its own ids; without per-sample
losses, a micro-batch whose loss is non-finite, or far above the others, is named.

To leave the named rows out of a resumed run: ``tg.load_bad_samples(path)`` reads the file the
Guard keeps in its ``checkpoint_dir`` (or :meth:`save_bad_samples` wrote), and
:class:`SkipSamples` wraps a sampler to skip them.

Torch-free (the decision core imports it): torch tensors, NumPy arrays, TensorFlow tensors and
plain lists are read through their ``tolist`` / ``numpy``.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from .detect.progress import _median
from .types import Finding

#: the finding kinds a batch can cause at its own step: a non-finite loss or gradient (unless
#: the weights or the optimizer state were already non-finite: origin "parameters" or
#: "optimizer"), a loss spike, a gradient explosion. Divergence, plateau and the structural
#: kinds build up over many batches and are not one batch's doing.
BATCH_KINDS = frozenset({"nonfinite", "loss_spike", "grad_explosion"})
#: a finding's evidence quotes at most this many of the batch's ids (its JSONL line stays a few
#: KB); ``guard.bad_batches`` and the bad-samples file keep them all
EVIDENCE_IDS = 64
#: at most this many rows are named as suspects: when more rows than this are needed to carry
#: half of the batch's excess loss, no row stands out and none is named (the batch as a whole is
#: the unit: a shifted distribution, a learning-rate effect); rows with a non-finite loss are
#: all named unless there are more than this many and they are most of the batch (then the
#: model or the step made them)
MAX_SUSPECTS = 8
#: a micro-batch whose loss is this many times the next highest one is named (the loss-spike
#: rule's jump, ``LossSpikeDetector(jump=2.5)``: a loss 2.5x its neighbour's is a spike there)
MICRO_JUMP = 2.5
#: bad batches kept in memory (``guard.bad_batches``); the counts and the file keep all
KEEP = 1000
FILE_VERSION = 1


@dataclass
class BadBatch:
    """One step judged bad, and the data it trained on.

    ``kinds``: the findings of :data:`BATCH_KINDS` at the step; ``actions``: what the policy
    planned for it (``skip``, ``rollback``, ``clip``, ...; empty when only observed);
    ``sample_ids``: every id shown for the step (all its micro-batches); ``suspect_ids``: the
    rows (or the micro-batch) most likely to blame, with ``suspect_losses``, and ``reason``
    says how they were chosen (empty when none stands out)."""

    step: int
    kinds: tuple[str, ...]
    actions: tuple[str, ...] = ()
    sample_ids: tuple[Any, ...] = ()
    suspect_ids: tuple[Any, ...] = ()
    suspect_losses: tuple[float | None, ...] = ()
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kinds": list(self.kinds), "actions": list(self.actions),
                "sample_ids": list(self.sample_ids), "suspect_ids": list(self.suspect_ids),
                "suspect_losses": list(self.suspect_losses), "reason": self.reason}

    def describe(self) -> str:
        """One line for consoles and loggers."""
        acted = f"; {', '.join(self.actions)}" if self.actions else ""
        who = (f"suspects {_quote(self.suspect_ids)} ({self.reason})" if self.suspect_ids
               else (self.reason or "no per-sample losses to single out a row"))
        return (f"bad batch ({', '.join(self.kinds)}{acted}): {len(self.sample_ids)} samples "
                f"{_quote(self.sample_ids)}; {who}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BadBatch":
        return cls(step=int(d["step"]), kinds=tuple(d.get("kinds", ())),
                   actions=tuple(d.get("actions", ())), sample_ids=tuple(d.get("sample_ids", ())),
                   suspect_ids=tuple(d.get("suspect_ids", ())),
                   suspect_losses=tuple(d.get("suspect_losses", ())), reason=str(d.get("reason", "")))


def _quote(ids: Sequence[Any], n: int = 8) -> str:
    head = ", ".join(str(i) for i in ids[:n])
    return f"[{head}{', ...' if len(ids) > n else ''}]"


def _is_sequence_like(x: Any) -> bool:
    return hasattr(x, "tolist") or hasattr(x, "numpy") or isinstance(x, (list, tuple, range))


def _host(x: Any) -> Any:
    """A torch tensor detached on the CPU, a TensorFlow tensor as NumPy, anything else as is."""
    if hasattr(x, "detach"):
        return x.detach().cpu()
    if not hasattr(x, "tolist") and hasattr(x, "numpy"):
        return x.numpy()
    return x


def check_ids(ids: Any, losses: Any = None) -> None:
    """Cheap checks on the hot path (no element is read): a 1-D array or tensor, or a list,
    tuple or range; per-sample losses of the same length."""
    if ids is None:
        if losses is not None:
            raise ValueError("sample_losses needs sample_ids: the ids of the rows those losses "
                             "belong to")
        return
    if isinstance(ids, (str, bytes)) or not _is_sequence_like(ids):
        raise TypeError("sample_ids must be the batch's dataset indices or row keys: a 1-D "
                        f"tensor, array, list, tuple or range, got {type(ids).__name__}")
    n = _length(ids, "sample_ids")
    if losses is not None:
        if isinstance(losses, (str, bytes)) or not _is_sequence_like(losses):
            raise TypeError("sample_losses must be the per-row losses (reduction='none'): a 1-D "
                            f"tensor, array, list or tuple, got {type(losses).__name__}")
        m = _length(losses, "sample_losses")
        if m != n:
            raise ValueError(f"sample_losses has {m} values but sample_ids has {n}: one loss per "
                             "row, in the same order")


def _length(x: Any, name: str) -> int:
    shape = getattr(x, "shape", None)
    if shape is not None:
        if len(shape) != 1:
            raise ValueError(f"{name} must be 1-D (one entry per row of the batch), got shape "
                             f"{tuple(shape)}")
        return int(shape[0])
    return len(x)


def _plain(v: Any) -> Any:
    """A JSON-safe id: int or str (a float index that is whole becomes an int)."""
    if not isinstance(v, (int, float, str, bytes)) and hasattr(v, "item"):
        try:
            v = v.item()  # a NumPy or torch scalar in a list
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, str)):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def read_ids(ids: Any) -> list[Any]:
    ids = _host(ids)
    vals = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if any(isinstance(v, (list, tuple)) for v in vals):
        raise ValueError("sample_ids must be 1-D (one id per row of the batch)")
    return [_plain(v) for v in vals]


def read_losses(losses: Any) -> list[float]:
    if hasattr(losses, "detach"):  # a torch tensor: fp32 on the host
        losses = losses.detach().float()
    losses = _host(losses)
    vals = losses.tolist() if hasattr(losses, "tolist") else list(losses)
    return [float(v) for v in vals]


#: one micro-batch's references, read only if its step turns out bad: (ids, per-row losses or
#: None, the micro-batch's own loss or None)
_Part = tuple


def _suspect_rows(ids: list[Any], losses: list[float]) -> tuple[list[Any], list[float | None], str]:
    """The rows to blame from per-sample losses."""
    bad = [(i, v) for i, v in zip(ids, losses) if not math.isfinite(v)]
    if len(bad) > MAX_SUSPECTS and 2 * len(bad) > len(ids):
        # most of the batch at once (an fp16 overflow in the forward, a NaN the model made):
        # the model or the step, not its rows; skipping them on resume would drop good data
        return [], [], (f"{len(bad)} of {len(ids)} rows have a non-finite loss: the model or the "
                        "step, not a few rows")
    if bad:
        return ([i for i, _ in bad], [None if math.isnan(v) else v for _, v in bad],
                f"{len(bad)} of {len(ids)} rows have a non-finite loss")
    if len(losses) < 2:
        return [], [], ""
    med = _median(losses)
    excess = sorted(((v - med, k) for k, v in enumerate(losses) if v > med), reverse=True)
    total = sum(e for e, _ in excess)
    if total <= 0:
        return [], [], "no row's loss is above the batch's median"
    acc, pick = 0.0, []
    for e, k in excess:
        pick.append(k)
        acc += e
        if acc >= 0.5 * total:
            break
    if len(pick) > MAX_SUSPECTS:
        return [], [], (f"the excess loss is spread over the batch ({len(pick)} rows carry half "
                        "of it): no row stands out")
    return ([ids[k] for k in pick], [losses[k] for k in pick],
            f"{len(pick)} of {len(ids)} rows carry {acc / total:.0%} of the loss above the "
            f"batch's median ({med:.4g})")


def _suspect_part(parts: list[_Part]) -> tuple[int | None, list[float], str]:
    """The micro-batch to blame from the micro-batches' own losses."""
    vals: list[float] = []
    for p in parts:
        v = p[2]
        if v is None:
            return None, [], ""
        v = _host(v.detach().float()) if hasattr(v, "detach") else _host(v)
        vals.append(float(v))
    bad = [k for k, v in enumerate(vals) if not math.isfinite(v)]
    if len(bad) > 1:  # more than one: not one micro-batch's doing
        return None, vals, f"{len(bad)} of {len(parts)} micro-batches have a non-finite loss"
    if bad:
        return bad[0], vals, f"micro-batch {bad[0] + 1} of {len(parts)} has a non-finite loss"
    if len(vals) < 2:
        return None, vals, ""
    order = sorted(range(len(vals)), key=lambda k: vals[k], reverse=True)
    top, nxt = vals[order[0]], vals[order[1]]
    if nxt > 0 and top >= MICRO_JUMP * nxt:
        return order[0], vals, (f"micro-batch {order[0] + 1} of {len(parts)} has loss {top:.4g}, "
                                f"{top / nxt:.1f}x the next highest")
    return None, vals, ""


def _attribute(step: int, parts: list[_Part], hit: list[Finding]) -> BadBatch:
    """Read a bad step's ids (and losses) and choose the suspects."""
    ids: list[Any] = []
    rows: list[float] | None = []
    for p_ids, p_losses, _ in parts:
        ids.extend(read_ids(p_ids))
        if rows is not None and p_losses is not None:
            rows.extend(read_losses(p_losses))
        else:
            rows = None
    suspects: list[Any] = []
    losses: list[float | None] = []
    reason = ""
    if rows is not None and len(rows) == len(ids):
        suspects, losses, reason = _suspect_rows(ids, rows)
    elif rows is not None:
        reason = (f"{len(rows)} per-row losses for {len(ids)} ids: they do not line up, no row "
                  "is named")
    elif len(parts) > 1:
        k, vals, reason = _suspect_part(parts)
        if k is not None:
            suspects = read_ids(parts[k][0])
            v = vals[k]
            losses = [None if math.isnan(v) else v] * len(suspects)
    return BadBatch(step=step, kinds=tuple(dict.fromkeys(f.kind for f in hit)),
                    sample_ids=tuple(ids), suspect_ids=tuple(suspects),
                    suspect_losses=tuple(losses), reason=reason)


class SampleLedger:
    """The decision core's record of which samples bad steps trained on."""

    def __init__(self, keep: int = KEEP) -> None:
        self.pending: dict[int, list[_Part]] = {}
        self.batches: deque[BadBatch] = deque(maxlen=keep)
        self.count = 0
        self.path: str | None = None  # a file rewritten (atomically) on every new bad batch
        # the input types checked in full (object: none yet)
        self._ids_type: type = object
        self._losses_type: type = object
        # every id a bad batch of the run named (bounded by the dataset, not by the run)
        self.suspects: set[Any] = set()
        self.rows: set[Any] = set()

    def offer(self, step: int, ids: Any, losses: Any = None, loss: Any = None) -> None:
        """Hold this micro-batch's references for ``step`` (no element is read). The inputs
        are checked in full (:func:`check_ids`) at the first call and whenever their types
        change: a healthy step pays a few attribute reads, not the checks."""
        if type(ids) is not self._ids_type or type(losses) is not self._losses_type:
            check_ids(ids, losses)
            self._ids_type, self._losses_type = type(ids), type(losses)
        pending = self.pending
        if not pending:  # the common case: nothing else waiting
            pending[step] = [(ids, losses, loss)]
            return
        parts = pending.get(step)
        if parts is None:  # the deferred mode's previous step, or steps never decided
            for s in [s for s in pending if s < step - 2]:
                del pending[s]
            pending[step] = [(ids, losses, loss)]
        else:
            parts.append((ids, losses, loss))

    def judge(self, step: int, findings: Sequence[Finding]) -> BadBatch | None:
        """Drop the references of ``step`` (and older); when a finding of
        :data:`BATCH_KINDS` is among ``findings``, read them, quote them in those findings'
        evidence and return the :class:`BadBatch` (its actions still to be filled in)."""
        parts = self.pending.pop(step, None)
        if self.pending:
            for s in [s for s in self.pending if s < step]:
                del self.pending[s]
        if parts is None or not findings:
            return None
        hit = [f for f in findings if f.kind in BATCH_KINDS
               and f.origin not in ("parameters", "optimizer")]
        if not hit:
            return None
        try:
            bad = _attribute(step, parts, hit)
        except Exception as e:  # never break a step over its ids (checked at the first offer)
            bad = BadBatch(step=step, kinds=tuple(dict.fromkeys(f.kind for f in hit)),
                           reason=f"the sample ids could not be read: {type(e).__name__}: {e}")
            for f in hit:
                f.evidence["sample_error"] = bad.reason
            return bad
        for f in hit:
            ev = f.evidence
            ev["sample_ids"] = list(bad.sample_ids[:EVIDENCE_IDS])
            ev["sample_count"] = len(bad.sample_ids)
            ev["suspect_ids"] = list(bad.suspect_ids[:EVIDENCE_IDS])
            if bad.reason:
                ev["suspect_reason"] = bad.reason
        return bad

    def record(self, bad: BadBatch) -> None:
        self.batches.append(bad)
        self.suspects.update(bad.suspect_ids)
        self.rows.update(bad.sample_ids)
        self.count += 1
        if self.path is not None:
            self.save(self.path)

    def save(self, path: str | os.PathLike) -> str:
        """Write the ids every bad batch of the run named, and the most recent bad batches
        (``KEEP``), to ``path`` (JSON, atomically)."""
        from ._fsio import atomic_write
        doc = {"trainguard_bad_samples": FILE_VERSION, "bad_batches": self.count,
               "suspect_ids": sorted_ids(self.suspects), "sample_ids": sorted_ids(self.rows),
               "batches": [b.to_dict() for b in self.batches]}
        atomic_write(path, lambda fh: json.dump(doc, fh, indent=1))
        return os.fspath(path)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "suspect_ids": sorted_ids(self.suspects),
                "sample_ids": sorted_ids(self.rows),
                "batches": [b.to_dict() for b in self.batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.clear()
        self.batches.extend(BadBatch.from_dict(d) for d in state.get("batches", []))
        self.suspects = set(state.get("suspect_ids", []))
        self.rows = set(state.get("sample_ids", []))
        self.count = int(state.get("count", len(self.batches)))


def sorted_ids(ids: Iterable[Any]) -> list[Any]:
    """Unique ids, ints first in order, then strings in order."""
    uniq = set(ids)
    return (sorted(i for i in uniq if isinstance(i, int))
            + sorted(i for i in uniq if not isinstance(i, int)))


def load_bad_samples(path: str | os.PathLike, *, whole_batches: bool = False) -> set[Any]:
    """The sample ids a run's bad-samples file names: the suspect rows (default), or every row
    of every bad batch (``whole_batches=True``). Plain JSON: nothing is unpickled."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or "trainguard_bad_samples" not in doc:
        raise ValueError(f"{os.fspath(path)} is not a trainguard bad-samples file (expected the "
                         "JSON that Guard(checkpoint_dir=...) or guard.save_bad_samples() writes)")
    return set(doc.get("sample_ids" if whole_batches else "suspect_ids", []))


@dataclass
class SkipSamples:
    """A sampler that leaves out the given sample ids (dataset indices): wrap the sampler of a
    resumed run's ``DataLoader``::

        bad = tg.load_bad_samples("ckpt/bad_samples.json")
        loader = DataLoader(ds, batch_size=32, sampler=tg.SkipSamples(RandomSampler(ds), bad))

    ``skipped`` counts the indices left out so far."""

    sampler: Iterable[Any]
    ids: Iterable[Any] = field(default_factory=set)
    skipped: int = 0

    def __post_init__(self) -> None:
        self.ids = frozenset(self.ids)

    def __iter__(self) -> Iterator[Any]:
        ids = self.ids
        for i in self.sampler:
            if i in ids:
                self.skipped += 1
                continue
            yield i

    def __len__(self) -> int:
        """Exact for a range and for samplers that draw each index of their ``data_source``
        once (SequentialSampler, RandomSampler without replacement); else the wrapped
        sampler's length, an upper bound."""
        n = len(self.sampler)  # type: ignore[arg-type]
        src = self.sampler if isinstance(self.sampler, range) else None
        if src is None and not getattr(self.sampler, "replacement", False):
            ds = getattr(self.sampler, "data_source", None)
            try:
                if ds is not None and n == len(ds):
                    src = range(n)
            except TypeError:
                pass
        if src is None:
            return n
        return n - sum(1 for i in self.ids if isinstance(i, int) and i in src)
