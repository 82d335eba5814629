"""A config's text read safely: a YAML file (bounded in size, UTF-8, no aliases, bounded nesting) or a key=value
override. What it cannot take is Refused with one line; job/config.py checks the names and values it returns."""

import os
import reprlib
from pathlib import Path

import yaml

MAX_CONFIG_BYTES = 2**20  # a config is a few kB: a larger file is a mistake, or meant to exhaust the parser


class Refused(ValueError):
    """Text that is not a config this job reads; the message is one line."""


def show(value: object, limit: int = 40) -> str:
    """value's repr for a message: at most about limit characters, built without the repr of the whole of it
    (a value in a config may be a megabyte long)."""
    short = reprlib.Repr()
    short.maxstring = short.maxlong = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    short.maxlevel = 2
    return short.repr(value)


class AliasUsed(yaml.YAMLError):
    """A YAML alias (*name) where a config is read."""

    def __init__(self, anchor: str, line: int):
        super().__init__(f"a YAML alias (*{anchor}) at line {line}")
        self.anchor, self.line = anchor, line


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without aliases: a config has no use for them, and nested ones expand without bound
    (nine aliases of nine aliases, nine deep, are 9**9 strings from 300 bytes, and a message's repr of them)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasUsed(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _yaml(text: str, where: str) -> object:
    """text parsed as YAML by _Loader; AliasUsed, yaml.YAMLError, or ValueError (an integer of more digits than
    Python converts, 4300) on what it cannot take; Refused naming where for nesting deeper than Python recurses."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except RecursionError:  # thousands of [ or {: PyYAML's composer recurses once per level
        raise Refused(f"{where} is nested too deeply to be a config (thousands of levels)") from None


def read(path: str | os.PathLike) -> dict | None:
    """The mapping of sections in the YAML file at path (None for an empty file)."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # no more than that is read, whatever the file is
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise Refused(f"config file not found: {path}") from None
    except OSError as e:
        raise Refused(f"cannot read config file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise Refused(f"config file {path} is {f'{size:,}' if size > MAX_CONFIG_BYTES else 'more than that many'} "
                      f"bytes; a config is a few kB (the limit is {MAX_CONFIG_BYTES:,})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(f"config file {path} is not UTF-8 text (byte {e.start}): is it the YAML file?") from None
    try:
        values = _yaml(text, str(path))
    except AliasUsed as e:
        raise Refused(f"{path} uses {e}: a config has no use for anchors and aliases, and they can expand "
                      f"without bound; write the values out") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise Refused(f"invalid YAML in {path}{line}: {problem}") from None
    except ValueError as e:  # PyYAML converting an integer of more than 4300 digits (Refused is one too: first)
        if isinstance(e, Refused):
            raise
        raise Refused(f"invalid YAML in {path}: {show(str(e), 80)}") from None
    if values is not None and not isinstance(values, dict):  # `false`, a list, a bare word: not "all defaults"
        shown = values[:40] if isinstance(values, str) else show(values)
        raise Refused(f"{path} must be a mapping of sections (model, data, train, mlflow), "
                      f"got {type(values).__name__} {shown!r}")
    return values


def parse_override(text: str) -> tuple[str, str, object, str]:
    """(section, key, value, raw) of a section.key=value override: the value as YAML reads it, else the text as
    typed (job/config.py checks it against the key's type); raw is the text as typed."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise Refused(f"override {show(text)} must look like section.key=value (e.g. train.epochs=10)")
    section, _, name = key.strip().partition(".")
    try:
        value = _yaml(raw, f"override {show(key.strip())}") if raw.strip() else ""
    except AliasUsed as e:
        raise Refused(f"override {show(key.strip())} uses a YAML alias (*{show(e.anchor)}): a config has no "
                      f"use for anchors and aliases, and they can expand without bound; write the value out")
    except (yaml.YAMLError, ValueError):  # not YAML (too many digits, too deep): the text as typed, which config checks
        value = raw
    return section, name, value, raw
