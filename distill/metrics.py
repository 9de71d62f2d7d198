"""One metrics interface, pluggable sinks: JSONL always, TensorBoard when asked and installed.

    metrics = Metrics([JsonlSink(url)])
    metrics.log(step=10, loss=0.8, syn_lr=0.01)
    metrics.close()

The JSONL file lives in the run directory (any fsspec URL); it is rewritten atomically on every
``flush`` so a crash never leaves a torn line. Ray Tune reporting is another sink, in tune/.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Protocol

from distill import storage

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, url: str, *, keep: list[dict] | None = None):
        self.url = url
        self.records: list[dict] = list(keep or [])

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def flush(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        storage.write_text(self.url, text)

    def close(self) -> None:
        self.flush()


class TensorBoardSink:
    """Scalars to TensorBoard (local directories only: the SummaryWriter writes files itself)."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(logdir)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Metrics:
    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def log(self, **record: Any) -> None:
        for sink in self.sinks:
            sink.write(record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_jsonl(url: str) -> list[dict]:
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]
