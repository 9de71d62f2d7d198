"""One map from exceptions to exit statuses and messages, for every entry point.

Library code raises, never exits; ``selmatch`` (launch/cli.py), ``python -m tune``
(tune/main.py) and ``accelerate launch distill/main.py`` each run their work through
:func:`run_guarded`, so the same failure exits the same way whatever command hit it, and a Ray
Tune trial or a CI job never mistakes a failure for a success:

| exit | what | exceptions (first match wins) |
| --- | --- | --- |
| 2 | bad input: a config field, a path, a file, a value; a run directory another command is writing | ConfigError, RunDirBusyError; FileNotFoundError, ValueError, KeyError; any other OSError |
| 1 | a run that went wrong: it diverged (the last good checkpoint is kept), ranks drifted apart, a search ended without a result | FloatingPointError, DivergedRanksError; any other RuntimeError |
| 130 | interrupted | KeyboardInterrupt |

Anything else is a bug and keeps its traceback (Python exits 1). With ``selmatch -v`` the
traceback of a mapped exception is logged too.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from distill.config import ConfigError
from distill.lock import RunDirBusyError
from distill.freshness import MissingStagesError
from distill.runtime import DivergedRanksError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExitRule:
    kinds: tuple[type[BaseException], ...]
    status: int
    message: str  # formatted with err (the exception) and kind (its class name)


EXIT_RULES: tuple[ExitRule, ...] = (
    ExitRule((ConfigError,), 2, "{err}"),  # one line per bad field, each naming it
    ExitRule((RunDirBusyError,), 2, "{err}"),  # refused before doing anything: names the holder
    ExitRule((FloatingPointError, DivergedRanksError), 1, "{err}"),  # says what to change
    ExitRule((FileNotFoundError, ValueError, KeyError), 2, "error: {err}"),
    ExitRule((OSError,), 2, "error: {kind}: {err}"),  # unreadable/unwritable paths, no network
    ExitRule((RuntimeError,), 1, "error: {err}"),
    ExitRule((KeyboardInterrupt,), 130, "interrupted"),
)


def exit_status(err: BaseException) -> tuple[int, str] | None:
    """(exit status, message) of ``err`` by :data:`EXIT_RULES`; None for an unmapped one."""
    for rule in EXIT_RULES:
        if isinstance(err, rule.kinds):
            return rule.status, rule.message.format(err=err, kind=type(err).__name__)
    return None


def arguments_text(config: str | None, overrides: list[str]) -> str | None:
    """The user's ``--config F`` and dotted overrides as one shell-quoted string (for the
    commands a message tells them to run next)."""
    if config is None:
        return None
    return " ".join(shlex.quote(a) for a in ["--config", config, *overrides])


def command_overrides(args, overrides: list[str]) -> list[str]:
    """``overrides`` plus the config fields given as flags (``--seeds 0 1 2`` or ``--seeds
    '[0, 1, 2]'``, ``--tuned``), as dotted overrides; a seed that is not an integer is a
    ConfigError naming it."""
    out = list(overrides)
    seeds = getattr(args, "seeds", None)
    if seeds:
        text = " ".join(seeds).strip()
        items = text.strip("[]").replace(",", " ").split()
        bad = [s for s in items if not s.lstrip("-").isdigit()]
        if bad or not items:
            raise ConfigError([f"--seeds takes integers (--seeds 0 1 2 or --seeds '[0, 1, 2]'), "
                               f"got {text!r}"])
        out.append(f"--seeds=[{', '.join(items)}]")
    if getattr(args, "tuned", False):
        out.append("--tuned=true")
    return out


def run_guarded(prog: str, work: Callable[[], int | None], *,
                arguments: str | None = None, quiet_input_errors: bool = False) -> int:
    """``work()``'s status (None = 0); a mapped exception becomes ``<prog>: <message>`` on stderr
    and its exit status, anything else propagates with its traceback. ``arguments`` (the user's
    ``--config F`` and overrides) complete the commands of a missing-stages message;
    ``quiet_input_errors`` keeps bad input (exit 2) silent (a rank other than 0 under a
    launcher: rank 0 says it once)."""
    try:
        return int(work() or 0)
    except BaseException as err:
        mapped = exit_status(err)
        if mapped is None:
            raise
        status, message = mapped
        if isinstance(err, MissingStagesError):
            message = err.render(arguments)
        log.debug("%s failed", prog, exc_info=err)
        if not (quiet_input_errors and status == 2):
            print(f"{prog}: {message}", file=sys.stderr)
        return status
