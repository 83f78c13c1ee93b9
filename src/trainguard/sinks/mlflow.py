"""MLflow sink: statistics and counters as metrics at their step (one ``log_batch`` per record),
findings and actions as an artifact ``trainguard/events.jsonl`` (rewritten at most once a minute
while events come, and at the end) and the summary as ``trainguard/summary.txt``.

``mlflow`` (``mlflow-skinny`` is enough) is imported when the sink is made. MLflow's SQL stores
turn NaN into 0 (a NaN loss then matches ``loss < 0.1`` in a search) and Inf into ±1.8e308:
this sink never logs a non-finite number (:class:`~trainguard.sinks.base.ScalarSink`).
"""
from __future__ import annotations

import json
import re
import time

from .base import ScalarSink

_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class MLflowSink(ScalarSink):
    """``MLflowSink(run_id=None)``: log into that run, else the active run
    (``mlflow.active_run()``), else a new run (ended at the end; only a run the sink started).
    ``tracking_uri=`` picks the store (default: MLflow's own setting)."""

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 modules: int = 32, flush_every_s: float = 60.0) -> None:
        super().__init__(modules=modules)
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("MLflowSink needs mlflow: pip install 'trainguard[mlflow]'") from e
        self._Metric = Metric
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._own = False
        if run_id is None:
            active = mlflow.active_run()
            if active is not None:
                run_id = active.info.run_id
            else:
                exp = mlflow.get_experiment_by_name("Default") if tracking_uri is None else None
                exp_id = exp.experiment_id if exp is not None else "0"
                run_id = self.client.create_run(exp_id).info.run_id
                self._own = True
        self.run_id = run_id
        self.flush_every_s = float(flush_every_s)
        self._flushed_at = time.monotonic()
        self._flushed_n = 0

    @staticmethod
    def key(name: str) -> str:
        """An MLflow metric name (alphanumerics, ``_ - . /`` and spaces)."""
        return _BAD_KEY.sub("_", name)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        metrics = [self._Metric(self.key(k), v, ts, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _text(self, step: int, tag: str, text: str) -> None:
        if (len(self.events) > self._flushed_n
                and time.monotonic() - self._flushed_at >= self.flush_every_s):
            self._flush()

    def _flush(self) -> None:
        body = "".join(json.dumps(e, default=str) + "\n" for e in self.events)
        self.client.log_text(self.run_id, body, "trainguard/events.jsonl")
        self._flushed_at, self._flushed_n = time.monotonic(), len(self.events)

    def _finish(self, summary: str | None) -> None:
        self._flush()
        if summary:
            self.client.log_text(self.run_id, summary + "\n", "trainguard/summary.txt")
        if self._own:
            self.client.set_terminated(self.run_id)
