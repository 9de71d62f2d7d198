"""Config I/O: YAML files and dotted overrides in, validated :class:`RunConfig` out, and back.

Loading order: dataclass defaults <- YAML file <- dotted command-line overrides
(``--distill.alpha 0.3``, ``--run_dir=/tmp/r``). Override values are parsed as YAML scalars, so
``null``, ``true``, ``1e-5`` and ``[a, b]`` mean what they mean in a config file. Types are checked
field by field against the dataclasses of distill/config.py, then the whole config by
distill/validation.py. Also where each repetition seed's config and directory are.

YAML is read by :func:`safe_yaml_load` only, for config files and override values alike: it
refuses, with a ConfigError naming the file or the override and the bound, a text whose aliases
would expand past a bound ("billion laughs": 372 bytes that expand to 9**9 items), whose nesting
is deeper than a bound, or that is larger than one; see ``MAX_YAML_*`` below. Any other reader of
YAML a user can write should use it too.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import reprlib
import types
import typing
from typing import Any

import yaml

from distill import storage
from distill.config import ConfigError, RunConfig, to_dict
from distill.validation import validate_config


# Bounds on one YAML text (a config file, or one override value). The shipped configs
# (configs/*.yaml) are under 3,000 characters, 100 nodes, 3 levels deep, with no alias; a fully
# resolved config (``selmatch config show``) is about 200 nodes and 3 levels. Every bound is
# far above any real config and far below what hurts: 10,000 nodes or 1,000,000 characters
# copy, compare and print in milliseconds, while aliases nested a few levels deep expand to
# billions (9 levels of 9 aliases: 9**9 items from 372 bytes, gigabytes once copied or printed),
# and a 20,000-deep ``[[[...]]]`` overflows Python's recursion limit.
MAX_YAML_CHARS = 1_000_000
"""Characters of the text, and of all its strings with each alias counted where it is used."""
MAX_YAML_NODES = 10_000
"""Nodes (each mapping, list, key and value) with each alias counted where it is used."""
MAX_YAML_DEPTH = 50
"""Levels of nesting, also counting where an alias puts a nested block."""
MAX_YAML_ALIASES = 1_000
"""Uses of aliases (``*name``) in one text."""


class YAMLBoundError(yaml.YAMLError):
    """A YAML text exceeds one of the ``MAX_YAML_*`` bounds (raised while it is composed)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), and counts
    nesting, nodes and aliases while composing, refusing a text past the ``MAX_YAML_*`` bounds
    before anything is constructed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = self._nodes = self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise YAMLBoundError(f"more than MAX_YAML_ALIASES = {MAX_YAML_ALIASES:,} uses "
                                     f"of aliases (*name) (line {line})")
        else:
            self._nodes += 1
            if self._nodes > MAX_YAML_NODES:
                raise YAMLBoundError(f"more than MAX_YAML_NODES = {MAX_YAML_NODES:,} nodes "
                                     f"(line {line})")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLBoundError(f"nested deeper than MAX_YAML_DEPTH = {MAX_YAML_DEPTH} "
                                     f"levels (line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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
        try:
            hash(key)
        except TypeError:
            continue  # a list as a key: SafeLoader's construct_mapping refuses it, naming the line
        if key in seen:
            raise DuplicateKeyError(f"key {_short(key)} appears twice in one mapping (lines "
                                    f"{seen[key]} and {line}): the second would silently replace "
                                    f"the first; merge them")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """repr() of a value cut to a few dozen characters, without building the whole repr (a
    value in a message may be large)."""
    return _REPR.repr(value)


def _measure(root: Any, children: Any, chars: Any) -> str | None:
    """Which ``MAX_YAML_*`` bound the tree under ``root`` exceeds, with every shared part
    counted each time it is reached (as a copy, a dump or a repr would expand it); None if none.

    Memoised by object id and iterative: linear in the *distinct* objects, so a bomb is measured
    without being expanded, and a deep tree without recursion. A cycle (``&a [*a]``) is
    infinite. ``children(x)`` lists x's children; ``chars(x)`` is its own characters.
    """
    done: dict[int, tuple[int, int, int]] = {}  # id -> (nodes, characters, depth)
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, expanded = stack.pop()
        key = id(obj)
        if expanded:
            open_.discard(key)
            nodes, text, depth = 1, chars(obj), 1
            for child in children(obj):
                n, c, d = done[id(child)]
                nodes, text, depth = nodes + n, text + c, max(depth, d + 1)
            if nodes > MAX_YAML_NODES:
                return (f"expands to more than MAX_YAML_NODES = {MAX_YAML_NODES:,} nodes "
                        f"(each alias counted where it is used)")
            if text > MAX_YAML_CHARS:
                return (f"expands to more than MAX_YAML_CHARS = {MAX_YAML_CHARS:,} characters "
                        f"(each alias counted where it is used)")
            if depth > MAX_YAML_DEPTH:
                return (f"expands to a nesting deeper than MAX_YAML_DEPTH = {MAX_YAML_DEPTH} "
                        f"levels (each alias counted where it is used)")
            done[key] = (nodes, text, depth)
            continue
        if key in done:
            continue
        if key in open_:
            return "refers to itself (as an alias inside its own anchor does): it never ends"
        open_.add(key)
        stack.append((obj, True))
        stack.extend((child, False) for child in children(obj))
    return None


def _node_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _node_chars(node: yaml.Node) -> int:
    return len(node.value) if isinstance(node, yaml.ScalarNode) else 0


def _data_children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [part for pair in obj.items() for part in pair]
    return list(obj) if isinstance(obj, (list, tuple, set, frozenset)) else []


def _data_chars(obj: Any) -> int:
    return len(obj) if isinstance(obj, (str, bytes)) else 0


def _check_data(obj: Any, where: str) -> None:
    """ConfigError naming ``where`` if a Python value exceeds the ``MAX_YAML_*`` bounds (a value
    a library caller passes may share parts or hold itself, as loaded YAML could)."""
    problem = _measure(obj, _data_children, _data_chars)
    if problem is not None:
        raise ConfigError([f"{where}: {problem}; refused before it is copied or printed"])


def safe_yaml_load(text: str, where: str) -> Any:
    """Load one YAML document with the project's loader (safe tags only, ``1e-5`` a float,
    duplicate keys an error), within the ``MAX_YAML_*`` bounds.

    ``where`` names the text in messages (a file's path, ``--section.field``). Raises
    ConfigError naming ``where`` and the bound when the text is larger, deeper or expands
    (through aliases) to more than a bound: checked while composing and on the composed nodes,
    before any Python object is built, so a "billion laughs" text is refused in milliseconds
    without being expanded. Raises DuplicateKeyError or another yaml.YAMLError when the text is
    not valid YAML.
    """
    how = ("a config is a mapping of sections, a few levels deep; "
           "write the values out instead of nesting or repeating aliases")
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError([f"{where}: {len(text):,} characters, more than "
                           f"MAX_YAML_CHARS = {MAX_YAML_CHARS:,}; refused before parsing: {how}"])
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _measure(node, _node_children, _node_chars)
        if problem is not None:
            raise ConfigError([f"{where}: {problem}; refused before it is expanded: {how}"])
        return loader.construct_document(node)
    except YAMLBoundError as err:
        raise ConfigError([f"{where}: {err}; refused before it is expanded: {how}"]) from None
    except ConfigError:
        raise
    except (ValueError, OverflowError) as err:  # a scalar YAML types but Python cannot build:
        # an int of more than 4,300 digits, a date 2024-13-01
        raise ConfigError([f"{where}: a value cannot be read ({type(err).__name__}: "
                           f"{str(err):.120})"]) from err
    except RecursionError:
        raise ConfigError([f"{where}: nested too deeply for the YAML parser (more than "
                           f"MAX_YAML_DEPTH = {MAX_YAML_DEPTH} levels): {how}"]) from None
    finally:
        loader.dispose()


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
                problems.append(f"{path} must be a mapping of fields, got {_short(value)}")
                continue
            kwargs[key] = _build(annotation, value, f"{path}.", problems)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            problems.append(f"{path} must be of type {_type_name(annotation)}, got "
                            f"{_short(value)}")
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

    Values are parsed as YAML scalars (by :func:`safe_yaml_load`, within its bounds; a value
    that is not valid YAML is kept as a string). A flag without a value is an error (booleans are
    written ``--data.download true``), so a forgotten value never swallows the next flag.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError([f"unexpected argument {_short(arg)}; overrides look like "
                               f"--section.field VALUE"])
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
            out[key] = safe_yaml_load(raw, f"--{key}") if raw != "" else ""
        except yaml.YAMLError:  # not YAML: the text itself (a ConfigError of a bound propagates)
            out[key] = raw
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown sections are reported by from_dict.

    The config and each value are measured against the ``MAX_YAML_*`` bounds before anything is
    copied (a value shared many times, as aliases make it, would be expanded by a copy)."""
    _check_data(data, "the configuration")
    for dotted, value in overrides.items():
        _check_data(value, f"--{dotted}")
    merged = copy.deepcopy(data)
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
            data = safe_yaml_load(text, path)
        except DuplicateKeyError as err:
            raise ConfigError([f"{path}: {err}"]) from err
        except yaml.YAMLError as err:
            raise ConfigError([f"{path}: not valid YAML ({err})"]) from err
        if data is None:
            raise ConfigError([f"{path} is empty (or only comments): a config is a mapping of "
                               f"sections such as data:, model:, distill: (e.g. "
                               f"configs/quickstart.yaml)"])
        if not isinstance(data, dict):
            raise ConfigError([f"{path} holds a YAML {type(data).__name__} ({_short(data)}), not a "
                               f"mapping of sections such as data:, model:, distill:"])
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        data = apply_overrides(data, overrides)
    if data.get("tuned") is True:  # tune's choice over the file, under the command line
        run_dir = data.get("run_dir", RunConfig().run_dir)
        chosen = {k: v for k, v in tuned_overlay(str(run_dir)).items()
                  if k not in (overrides or {})}
        data = apply_overrides(data, chosen)
    return from_dict(data, check=check)


TUNED = ("select.init", "select.beta", "distill.alpha")
"""The fields ``tune/selected.yaml`` sets (``tuned: true`` / ``--tuned`` applies them)."""


def tuned_overlay(run_dir: str) -> dict[str, Any]:
    """``{"select.init": i, "select.beta": b, "distill.alpha": a}`` from
    ``<run_dir>/tune/selected.yaml`` (verified); a ConfigError naming the file when it is
    missing or is not what ``selmatch tune`` writes."""
    from distill import integrity

    url = storage.join(run_dir, "tune", "selected.yaml")
    fix = "run `selmatch tune --config F` (finished trials are reused)"
    if not storage.exists(url):
        raise ConfigError([f"tuned: true (--tuned) needs {url}, which does not exist; {fix}"])
    try:
        data = safe_yaml_load(integrity.read_text(url, fix=fix), url)
        values = {"select.init": data["select"]["init"], "select.beta": data["select"]["beta"],
                  "distill.alpha": data["distill"]["alpha"]}
    except integrity.DamagedArtifactError as err:
        raise ConfigError([f"tuned: {err}"]) from err
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError([f"tuned: {url} is not the overlay selmatch tune writes "
                           f"({type(err).__name__}: {err}); {fix}"]) from err
    return values


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, run_dir: str | None = None) -> str:
    """Write the resolved config as ``<run_dir>/config.yaml`` (atomically; not rewritten when
    it holds the same text already); returns the URL."""
    url = storage.join(run_dir or cfg.run_dir, "config.yaml")
    text = dump_yaml(cfg)
    if not (storage.exists(url) and storage.read_text(url) == text):
        storage.write_text(url, text)
    return url


# --------------------------------------------------------------------------------------------
# Repetitions
# --------------------------------------------------------------------------------------------


def rep_dir(cfg: RunConfig, seed: int) -> str:
    """Where repetition ``seed`` lives: run_dir for the run seed, run_dir/seeds/<s> otherwise."""
    return cfg.run_dir if seed == cfg.seed else storage.join(cfg.run_dir, "seeds", str(seed))


def repetition(cfg: RunConfig, seed: int) -> RunConfig:
    """The config of repetition ``seed``: ``seed`` = that seed and ``run_dir`` = :func:`rep_dir`;
    experts, scores and the window search stay the run's."""
    return dataclasses.replace(cfg, seed=seed, run_dir=rep_dir(cfg, seed))


def repetitions(cfg: RunConfig) -> list[RunConfig]:
    """One config per repetition seed (``seeds``, default ``[seed]``)."""
    return [repetition(cfg, s) for s in (cfg.seeds or [cfg.seed])]
