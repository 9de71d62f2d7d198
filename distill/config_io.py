"""Config I/O: YAML files and dotted overrides in, validated :class:`RunConfig` out, and back.

Loading order: dataclass defaults <- YAML file <- dotted command-line overrides
(``--distill.alpha 0.3``, ``--run_dir=/tmp/r``). Override values are parsed as YAML scalars, so
``null``, ``true``, ``1e-5`` and ``[a, b]`` mean what they mean in a config file. Types are checked
field by field against the dataclasses of distill/config.py, then the whole config by
distill/validation.py. Also where each repetition seed's config and directory are.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any

import yaml

from distill import storage
from distill.config import ConfigError, RunConfig, to_dict
from distill.validation import validate_config


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"""),
    list("-+0123456789."),
)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML file names a key twice (YAML would keep the last one silently)."""


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKeyError(f"key {key!r} appears twice in one mapping (lines "
                                    f"{seen[key]} and {line}): the second would silently replace "
                                    f"the first; merge them")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check ``value`` against a field annotation; returns (ok, coerced value).

    Only the annotations used above are handled: str, int, float, bool, dict, list[X], X | None.
    An int is accepted for a float field (YAML writes 1000 for 1000.0); a bool is never an int.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is type(None):
                continue
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(annotation)
        coerced = []
        for v in value:
            ok, c = _type_ok(v, item)
            if not ok:
                return False, value
            coerced.append(c)
        return True, coerced
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    return True, value


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``, appending a line to ``problems`` per bad key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            problems.append(f"{path}: unknown field; valid fields: {', '.join(names)}")
            continue
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                problems.append(f"{path} must be a mapping of fields, got {value!r}")
                continue
            kwargs[key] = _build(annotation, value, f"{path}.", problems)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            problems.append(f"{path} must be of type {_type_name(annotation)}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def from_dict(data: dict[str, Any], *, check: bool = True) -> RunConfig:
    """Build a RunConfig from a nested dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError([f"the configuration must be a mapping, got {type(data).__name__}"])
    problems: list[str] = []
    cfg = _build(RunConfig, data, "", problems)
    if problems:
        raise ConfigError(problems)
    if check:
        validate_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--distill.alpha", "0.3", "--run_dir=/tmp/r"]`` -> ``{"distill.alpha": 0.3, "run_dir": "/tmp/r"}``.

    Values are parsed as YAML scalars. A flag without a value is an error (booleans are written
    ``--data.download true``), so a forgotten value never swallows the next flag.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError([f"unexpected argument {arg!r}; overrides look like --section.field VALUE"])
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError([f"override --{key} has no value"])
            raw = args[i + 1]
            i += 2
        try:
            out[key] = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown sections are reported by from_dict."""
    merged = json.loads(json.dumps(data))
    for dotted, value in overrides.items():
        node = merged
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{dotted}: {part} is not a section"])
            node = child
        node[parts[-1]] = value
    return merged


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def load_config(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                *, check: bool = True) -> RunConfig:
    """Defaults <- YAML file (path or fsspec URL) <- overrides; validated unless ``check=False``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = storage.read_text(path)
        except FileNotFoundError as err:
            raise ConfigError([f"config file not found: {path}"]) from err
        except IsADirectoryError as err:
            raise ConfigError([f"--config {path} is a directory; give a YAML file "
                               f"(e.g. configs/quickstart.yaml)"]) from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError([f"--config {path} cannot be read as a text file "
                               f"({type(err).__name__}: {err})"]) from err
        try:
            data = _yaml_load(text)
        except DuplicateKeyError as err:
            raise ConfigError([f"{path}: {err}"]) from err
        except yaml.YAMLError as err:
            raise ConfigError([f"{path}: not valid YAML ({err})"]) from err
        if data is None:
            raise ConfigError([f"{path} is empty (or only comments): a config is a mapping of "
                               f"sections such as data:, model:, distill: (e.g. "
                               f"configs/quickstart.yaml)"])
        if not isinstance(data, dict):
            raise ConfigError([f"{path} holds a YAML {type(data).__name__} ({data!r:.40}), not a "
                               f"mapping of sections such as data:, model:, distill:"])
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        data = apply_overrides(data, overrides)
    return from_dict(data, check=check)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, run_dir: str | None = None) -> str:
    """Write the resolved config as ``<run_dir>/config.yaml`` (atomically); returns the URL."""
    url = storage.join(run_dir or cfg.run_dir, "config.yaml")
    storage.write_text(url, dump_yaml(cfg))
    return url


# --------------------------------------------------------------------------------------------
# Repetitions
# --------------------------------------------------------------------------------------------


def rep_dir(cfg: RunConfig, seed: int) -> str:
    """Where repetition ``seed`` lives: run_dir for the run seed, run_dir/seeds/<s> otherwise."""
    return cfg.run_dir if seed == cfg.seed else storage.join(cfg.run_dir, "seeds", str(seed))


def repetitions(cfg: RunConfig) -> list[RunConfig]:
    """One config per repetition seed (``seeds``, default ``[seed]``): ``seed`` = that seed and
    ``run_dir`` = :func:`rep_dir`; experts, scores and the window search stay the run's."""
    return [dataclasses.replace(cfg, seed=s, run_dir=rep_dir(cfg, s))
            for s in (cfg.seeds or [cfg.seed])]
