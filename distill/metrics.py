"""One metrics interface, pluggable sinks: JSONL always, TensorBoard when asked and installed.

    metrics = Metrics([JsonlSink(url), *tensorboard_sinks(cfg, "distill_selmatch")])
    metrics.log(step=10, loss=0.8, syn_lr=0.01)
    metrics.close()

The JSONL file lives in the run directory (any fsspec URL); it is rewritten atomically on every
``flush`` so a crash never leaves a torn line. Ray Tune reporting is another sink, in tune/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Protocol

from distill import storage

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def resume_after(self, step: int) -> None: ...


class JsonlSink:
    """Records as JSON lines; with ``checked`` the file gets a checksum (distill/integrity.py),
    for logs that a later command trusts (the trials a restarted search reuses)."""

    def __init__(self, url: str, *, keep: list[dict] | None = None, checked: bool = False):
        self.url, self.checked = url, checked
        self.records: list[dict] = list(keep or [])

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def resume_after(self, step: int) -> None:
        """A run resumed from its checkpoint at ``step``: keep the records the file holds up to
        ``step``; those an earlier session logged after it are dropped (logged again now)."""
        self.records = [r for r in read_jsonl(self.url) if r.get("step", 0) <= step]

    def flush(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        if self.checked:
            from distill import integrity

            integrity.write_text(self.url, text)
        else:
            storage.write_text(self.url, text)

    def close(self) -> None:
        self.flush()


_NOT_SCALARS = ("step", "seed")  # record keys that say where a value belongs, not values


class TensorBoardSink:
    """Numeric fields as TensorBoard scalars (tag = field name, step = ``record["step"]``).

    The SummaryWriter writes local files; for a remote run directory (``s3://``, ``memory://``)
    it writes to a temporary folder whose event files are copied to ``url`` on every flush.
    """

    def __init__(self, url: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.url = url
        local = storage.local_path(url)
        self._tmp = None if local is not None else tempfile.mkdtemp(prefix="selmatch-tb-")
        self.logdir = local if local is not None else self._tmp
        self._writer_class = SummaryWriter
        self._writer = None  # opened by the first record: resume_after must come before it
        self._purge_step: int | None = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._writer_class(self.logdir, purge_step=self._purge_step)
        return self._writer

    def resume_after(self, step: int) -> None:
        """A run resumed from its checkpoint at ``step``: TensorBoard hides what earlier sessions
        logged after ``step`` (SummaryWriter's ``purge_step``), so no step shows twice."""
        if self._writer is not None:
            raise RuntimeError(f"TensorBoardSink({self.url}): resume_after must be called "
                               f"before the first record")
        self._purge_step = step + 1

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if (key not in _NOT_SCALARS and isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)):
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._writer is None:  # nothing logged: no event file
            return
        self._writer.flush()
        if self._tmp is not None:
            for name in sorted(os.listdir(self._tmp)):
                with open(os.path.join(self._tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(self.url, name), f.read())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.flush()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def tensorboard_dir(cfg, name: str, source=None) -> str:
    """Where ``name``'s event files go: ``<run_dir>/tensorboard/<name>``; for a repetition seed
    of ``source`` (its run directory ``<source run_dir>/seeds/<s>``, distill/config_io.py) under
    the run's own: ``<source run_dir>/tensorboard/seed_<s>/<name>``, so that one ``--logdir``
    shows every seed."""
    if source is not None and cfg.run_dir == storage.join(source.run_dir, "seeds", str(cfg.seed)):
        return storage.join(source.run_dir, "tensorboard", f"seed_{cfg.seed}", name)
    return storage.join(cfg.run_dir, "tensorboard", name)


def tensorboard_sinks(cfg, name: str, source=None) -> list[Sink]:
    """``[TensorBoardSink(tensorboard_dir(...))]`` when ``metrics.tensorboard``, else []."""
    if not cfg.metrics.tensorboard:
        return []
    return [TensorBoardSink(tensorboard_dir(cfg, name, source))]


def rewrite_metrics(cfg, name: str, records: list[dict]) -> None:
    """Replace ``<run_dir>/logs/<name>.jsonl`` (and, with ``metrics.tensorboard``,
    ``<run_dir>/tensorboard/<name>/``) by ``records``: for metrics derived from artifacts, which
    are recomputed as a whole, so no value ever shows twice."""
    sinks: list[Sink] = [JsonlSink(storage.join(cfg.run_dir, "logs", f"{name}.jsonl"))]
    if cfg.metrics.tensorboard:
        target = tensorboard_dir(cfg, name)
        storage.remove(target)
        sinks.append(TensorBoardSink(target))
    metrics = Metrics(sinks)
    for rec in records:
        metrics.log(**rec)
    metrics.close()


class Metrics:
    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def log(self, **record: Any) -> None:
        for sink in self.sinks:
            sink.write(record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def resume_after(self, step: int) -> None:
        """Continue the metrics of a run resumed from its checkpoint at ``step`` (each sink drops
        or hides what an earlier session logged after it); call before logging anything."""
        for sink in self.sinks:
            sink.resume_after(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_jsonl(url: str) -> list[dict]:
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]
