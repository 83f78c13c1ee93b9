"""TensorBoard sink: statistics as scalars, findings and actions as text, both at their step.

``torch.utils.tensorboard`` (and the ``tensorboard`` package under it) is imported when the sink
is made, never at ``import trainguard``. Non-finite statistics are never written as bare NaN
(TensorBoard draws nothing between NaN points): see :class:`~trainguard.sinks.base.ScalarSink`.
"""
from __future__ import annotations

import os
from typing import Any

from .base import PREFIX, ScalarSink


class TensorBoardSink(ScalarSink):
    """``TensorBoardSink(log_dir)`` writes event files under ``log_dir`` (read them with
    ``tensorboard --logdir``); ``writer=`` reuses a ``SummaryWriter`` the loop already has (it
    is flushed, not closed, at the end)."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None,
                 modules: int = 32) -> None:
        super().__init__(modules=modules)
        if writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardSink needs a log_dir (a folder for the event files) "
                                 "or writer= (a torch.utils.tensorboard.SummaryWriter)")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardSink needs the tensorboard package: "
                                  "pip install 'trainguard[tensorboard]'") from e
            writer = SummaryWriter(log_dir=os.fspath(log_dir))
            self._own = True
        else:
            if not callable(getattr(writer, "add_scalar", None)):
                raise TypeError("writer must be a torch.utils.tensorboard.SummaryWriter, got "
                                f"{type(writer).__name__}")
            self._own = False
        self.writer = writer

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        add = self.writer.add_scalar
        for k, v in values.items():
            add(k, v, step)

    def _text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def _finish(self, summary: str | None) -> None:
        if summary:
            # TensorBoard renders text as Markdown: indent to keep the summary's layout
            self.writer.add_text(f"{PREFIX}/summary",
                                 "\n".join("    " + line for line in summary.splitlines()),
                                 max([e["step"] for e in self.events], default=0))
        if self._own:
            self.writer.close()
        else:
            self.writer.flush()
