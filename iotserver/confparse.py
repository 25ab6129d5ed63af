"""Typed reading of a parsed TOML document with errors that name the key, the line and the need.

A :class:`Reader` wraps one table. Every getter records the key as known; :meth:`Reader.done`
then reports the first unknown key, so a misspelt option never passes silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")

# Reader has methods named ``str`` and ``bool``: below them, inside the class body, those names
# mean the methods, so its annotations use these aliases of the builtins.
_Str: TypeAlias = str
_Bool: TypeAlias = bool

_MISSING: Any = object()


class ConfigError(Exception):
    """A configuration problem, printed to the user as one line (never a traceback)."""

    def __init__(
        self, key: str, message: str, *, source: str = "", line: int | None = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.source = source
        self.line = line

    def __str__(self) -> str:
        where = self.source or "config"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


class LineFinder:
    """Best-effort line numbers for key paths (tomllib keeps no positions).

    Understands ``[a.b]`` and ``[[a]]`` headers and ``key =`` lines, which covers the way our
    configuration files are written; returns None when it cannot tell.
    """

    _header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _key = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def find(self, key_path: str) -> int | None:
        parts = re.findall(r"([^.\[\]]+)|\[(\d+)\]", key_path)
        tables: list[str] = []
        index_of: dict[str, int] = {}
        leaf: str | None = None
        for name, idx in parts:
            if name:
                tables.append(name)
            else:
                index_of[".".join(tables)] = int(idx)
        # The last name is a key in the innermost table unless it names a table itself.
        if tables:
            leaf = tables[-1]
        header_line = self._find_header(tables, index_of)
        if header_line is not None:
            return header_line + 1
        header_line = self._find_header(tables[:-1], index_of)
        start = 0 if header_line is None else header_line + 1
        if header_line is None and len(tables) > 1:
            return None
        for n in range(start, len(self.lines)):
            text = self.lines[n]
            if n > start and self._header.match(text):
                break
            m = self._key.match(text)
            if m and m.group(1).strip("\"'") == leaf:
                return n + 1
        return header_line + 1 if header_line is not None else None

    def _find_header(self, tables: list[str], index_of: dict[str, int]) -> int | None:
        if not tables:
            return None
        name = ".".join(tables)
        wanted = index_of.get(name, 0)
        seen = 0
        for n, text in enumerate(self.lines):
            m = self._header.match(text)
            if m and m.group(2).replace(" ", "") == name:
                if seen == wanted:
                    return n
                seen += 1
        return None


class Context:
    """What every reader of one document shares: its name, its text (for lines), its folder."""

    def __init__(self, source: str, text: str, base_dir: Path) -> None:
        self.source = source
        self.finder = LineFinder(text)
        self.base_dir = base_dir

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(key, message, source=self.source, line=self.finder.find(key))


class Reader:
    """Typed access to one TOML table at ``prefix`` (e.g. ``modbus.devices[0]``)."""

    def __init__(self, data: dict[str, Any], prefix: str, ctx: Context) -> None:
        self.data = data
        self.prefix = prefix
        self.ctx = ctx
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return self.ctx.error(self.key(name), message)

    def has(self, name: str) -> bool:
        self._seen.add(name)
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._seen.add(name)
        if name not in self.data:
            if default is _MISSING:
                raise self.error(name, "is required")
            return default
        return self.data[name]

    def _typed(self, name: str, default: Any, check: Callable[[Any], bool], what: str) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING and name not in self.data:
            return default
        if not check(value):
            raise self.error(name, f"expected {what}, got {_describe(value)}")
        return value

    def str(self, name: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._typed(name, default, lambda v: isinstance(v, str), "a string")
        if choices and value is not None and value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def bool(self, name: _Str, default: Any = _MISSING) -> Any:
        return self._typed(name, default, lambda v: isinstance(v, bool), "true or false")

    def int(
        self, name: _Str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._typed(
            name, default, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )
        self._check_range(name, value, min, max)
        return value

    def float(
        self,
        name: _Str,
        default: Any = _MISSING,
        *,
        min: float | None = None,
        max: float | None = None,
        positive: _Bool = False,
    ) -> Any:
        value = self._typed(
            name,
            default,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
            "a number",
        )
        if value is None:
            return None
        value = float(value)
        if positive and value <= 0:
            raise self.error(name, f"expected a number > 0, got {value!r}")
        self._check_range(name, value, min, max)
        return value

    def _check_range(self, name: _Str, value: Any, lo: Any, hi: Any) -> None:
        if value is None:
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{lo if lo is not None else '-inf'} .. {hi if hi is not None else 'inf'}"
            raise self.error(name, f"expected a value in {bounds}, got {value!r}")

    def str_list(self, name: _Str, default: Any = _MISSING) -> Any:
        value = self._typed(
            name,
            default,
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "an array of strings",
        )
        return tuple(value) if value is not None else None

    def number_pair(self, name: _Str, default: Any = _MISSING) -> Any:
        value = self._typed(
            name,
            default,
            lambda v: (
                isinstance(v, list)
                and len(v) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            ),
            "an array of two numbers [low, high]",
        )
        if value is None:
            return None
        lo, hi = float(value[0]), float(value[1])
        if not lo < hi:
            raise self.error(name, f"expected low < high, got [{value[0]}, {value[1]}]")
        return lo, hi

    def path(self, name: _Str, default: Any = _MISSING) -> Any:
        """A filesystem path; relative paths are relative to the config file's folder."""
        value = self.str(name, default)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.ctx.base_dir / p)

    def endpoint(self, name: _Str, default: Any = _MISSING, *, kinds: tuple[_Str, ...] = (),
                 why: _Str = "") -> Any:
        """A listening address (``tcp:1883:interface=127.0.0.1``, ``tls:8883``...), checked by
        the one endpoint parser that the listeners use (``kinds``/``why``: see
        ``parse_endpoint``); returned as the string."""
        from iotserver.edge.endpoint import KINDS, EndpointError, parse_endpoint

        value = self.str(name, default)
        if value is None:
            return None
        try:
            parse_endpoint(value, kinds or KINDS, why)
        except EndpointError as exc:
            raise self.error(name, str(exc)) from None
        return value

    def table(self, name: _Str, *, required: _Bool = False) -> Reader:
        value = self.raw(name, _MISSING if required else {})
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {_describe(value)}")
        return Reader(value, self.key(name), self.ctx)

    def tables(self, name: _Str) -> list[Reader]:
        value = self.raw(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, f"expected an array of tables ([[{self.key(name)}]])")
        return [Reader(v, f"{self.key(name)}[{i}]", self.ctx) for i, v in enumerate(value)]

    def done(self) -> None:
        """Raise on the first key nobody asked for (unknown keys are errors)."""
        for name in self.data:
            if name not in self._seen:
                raise self.error(name, "unknown key")


def check_endpoint(description: str) -> str | None:
    """A reason why ``description`` is not a usable server endpoint string, or None
    (``iotserver.edge.endpoint`` is the parser; this is its yes/no form)."""
    from iotserver.edge.endpoint import EndpointError, parse_endpoint

    try:
        parse_endpoint(description)
    except EndpointError as exc:
        return str(exc)
    return None


def is_loopback_endpoint(description: str) -> bool:
    """True when the endpoint listens on a loopback interface only (or a unix socket)."""
    from iotserver.edge.endpoint import parse_endpoint

    return parse_endpoint(description).loopback
