"""MQTT access control: who may publish, subscribe to and receive which topics.

Rules are evaluated **first match wins**, in order: the explicit rules (inline ``[[mqtt.acl]]``
entries, then those of the ``acl_file``), then the role defaults derived from the user file.
For one operation (read or write) on one topic, the first rule whose subject matches the client
and whose topic filter matches the topic, and that either grants the operation or is ``deny``,
decides. No deciding rule means no access (default deny).

A rule::

    [[acl]]
    user = "alice"            # optional: this user (or the anonymous user name, see below)
    client = "plc-7"          # optional: this client identifier
    role = "engineer"         # optional: users with this role in the user file
    topic = "devices/%c/#"    # MQTT topic filter; %u = user name, %c = client id
    access = "readwrite"      # read | write | readwrite | deny

All given subject keys must match; a rule without any applies to every client. A substitution
whose value is missing, empty, starts with ``$`` or contains ``+``, ``#`` or ``/`` is refused
(it would widen the filter): an allow rule is then skipped, a deny rule denies everything.

Subscriptions: a topic filter is granted when it can match at least one topic the client may
read, and refused (0x87) when every topic it can match is denied or granted by no rule. What a
granted filter matches beyond the readable topics is never delivered: every delivery is
checked per topic (``can_receive``, cached per identity and topic, and the broker's routing plan
per topic holds the result). So ``#`` next to a deny on ``test/nosubscribe`` is granted and
delivers everything but that topic. The check works on filters, without enumerating topics: a
read rule overlapping the filter grants it unless an earlier deny rule covers that overlap
(when only several deny rules together cover it, the filter is granted and delivers nothing
from there: delivery is where access is enforced).
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotserver.confparse import ConfigError, Context, Reader
from iotserver.mqtt.topics import is_valid_topic_filter, is_valid_topic_name, matches, parse_shared

ROLES = ("operator", "engineer", "admin")
# Decisions remembered per identity and operation: topics repeat in a plant, and the bridge's
# tag topics alone can number 100k (a smaller cache misses on every publish).
_CACHE_LIMIT = 262_144
_IDENTITY_LIMIT = 4096  # identities (user, client id) with compiled rules


class AclError(ValueError):
    """An ACL file or rule that cannot be used; the message names the file and the key."""


class Access(enum.IntFlag):
    """What a rule grants; DENY (no bits) refuses both directions."""

    DENY = 0
    READ = 1
    WRITE = 2
    READWRITE = 3

    @classmethod
    def parse(cls, text: str) -> Access:
        return _ACCESS_NAMES[text]


_ACCESS_NAMES = {
    "read": Access.READ,
    "write": Access.WRITE,
    "readwrite": Access.READWRITE,
    "deny": Access.DENY,
}


@dataclass(frozen=True, slots=True)
class AclRule:
    """One rule as written by the user (``topic`` may still hold ``%u`` / ``%c``)."""

    topic: str
    access: Access
    user: str | None = None
    client: str | None = None
    role: str | None = None

    def __post_init__(self) -> None:
        problem = check_rule_topic(self.topic)
        if problem:
            raise AclError(f"topic {self.topic!r}: {problem}")


def check_rule_topic(topic: str) -> str | None:
    """Why ``topic`` is not a usable rule filter, or None (placeholders count as one level)."""
    probe = topic.replace("%u", "u").replace("%c", "c")
    if not is_valid_topic_filter(probe):
        return "expected an MQTT topic filter ('+' and '#' only as whole levels, '#' last)"
    if parse_shared(probe) is not None:
        return "rules name the topics, not '$share/...' subscription filters"
    return None


# --------------------------------------------------------------------------- parsing


def parse_rule(r: Reader) -> AclRule:
    """One ``[[acl]]`` / ``[[mqtt.acl]]`` table, with errors naming the key and line."""
    topic = r.str("topic")
    problem = check_rule_topic(topic)
    if problem:
        raise r.error("topic", problem)
    access = Access.parse(r.str("access", choices=tuple(_ACCESS_NAMES)))
    rule = AclRule(
        topic=topic,
        access=access,
        user=r.str("user", None),
        client=r.str("client", None),
        role=r.str("role", None, choices=ROLES),
    )
    r.done()
    return rule


def parse_rules(readers: Iterable[Reader]) -> tuple[AclRule, ...]:
    return tuple(parse_rule(r) for r in readers)


def load_acl_file(path: Path) -> tuple[AclRule, ...]:
    """Rules from a TOML file of ``[[acl]]`` tables. Raises AclError naming file, key and line."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise AclError(f"{path}: ACL file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AclError(f"{path}: {exc}") from None
    root = Reader(data, "", Context(str(path), text, path.parent))
    try:
        rules = parse_rules(root.tables("acl"))
        root.done()
    except ConfigError as exc:
        raise AclError(str(exc)) from None
    return rules


# --------------------------------------------------------------------------- filter algebra


def covers(outer: str, inner: str) -> bool:
    """True when every topic name ``inner`` can match is also matched by ``outer``.

    Both are valid topic filters. Honours MQTT-4.7.2-1: a filter starting with a wildcard matches
    no ``$`` topic, so ``#`` does not cover ``$SYS/#``.
    """
    o = outer.split("/")
    i = inner.split("/")
    if o[0] in ("+", "#") and i[0][:1] == "$":
        return False
    for n, f in enumerate(i):
        if n >= len(o):
            return False
        r = o[n]
        if r == "#":
            return True
        if f == "#":
            # inner matches every topic of at least max(n, 1) levels (MQTT-4.7.1-2: its parent
            # too); outer's "+/#" here matches at least n + 1 levels: the same only at the root
            return n == 0 and o[n:] == ["+", "#"]
        if r == "+":
            continue
        if f == "+" or f != r:
            return False
    # inner has exactly len(i) levels
    return len(o) == len(i) or (len(o) == len(i) + 1 and o[-1] == "#")


def intersect(a: str, b: str) -> str | None:
    """A filter matching exactly the topics both filters match, or None when they share none."""
    x = a.split("/")
    y = b.split("/")
    if (x[0] in ("+", "#") and y[0][:1] == "$") or (y[0] in ("+", "#") and x[0][:1] == "$"):
        return None
    out: list[str] = []
    n = 0
    while True:
        p = x[n] if n < len(x) else None
        q = y[n] if n < len(y) else None
        if p == "#":
            return "/".join(out + y[n:]) if (out or y[n:]) else "#"
        if q == "#":
            return "/".join(out + x[n:]) if (out or x[n:]) else "#"
        if p is None or q is None:
            return "/".join(out) if p is None and q is None else None
        if p == "+":
            out.append(q)
        elif q == "+" or p == q:
            out.append(p)
        else:
            return None
        n += 1


# --------------------------------------------------------------------------- evaluation


def _substitute(topic: str, user: str | None, client_id: str) -> str | None:
    """Fill %u / %c; None when a value would widen the filter (so the rule must not grant)."""
    if "%" not in topic:
        return topic
    for placeholder, value in (("%u", user), ("%c", client_id)):
        if placeholder in topic:
            if not value or value[0] == "$" or "+" in value or "#" in value or "/" in value:
                return None
            if "\x00" in value:
                return None
            topic = topic.replace(placeholder, value)
    return topic


class _Rule:
    """A rule compiled for one identity: a concrete filter, or a built-in matcher."""

    __slots__ = ("access", "filter", "match_all", "prefix", "suffix")

    def __init__(
        self,
        access: Access,
        topic_filter: str | None = None,
        *,
        match_all: bool = False,
        prefix: str = "",
        suffix: str = "",
    ) -> None:
        self.access = access
        self.filter = topic_filter
        self.match_all = match_all
        self.prefix = prefix  # prefix/suffix rule: "<prefix>/tags/" ... "/set" (any depth)
        self.suffix = suffix

    def matches(self, topic: str) -> bool:
        if self.filter is not None:
            return matches(self.filter, topic)
        if self.match_all:
            return True
        return (
            topic.startswith(self.prefix)
            and topic.endswith(self.suffix)
            and len(topic) > len(self.prefix) + len(self.suffix)
        )

    def covers(self, topic_filter: str) -> bool:
        if self.filter is not None:
            return covers(self.filter, topic_filter)
        return self.match_all

    def overlap(self, topic_filter: str) -> str | None:
        """The part of ``topic_filter`` this rule can match (as a filter), or None."""
        if self.filter is not None:
            return intersect(self.filter, topic_filter)
        if self.match_all:
            return topic_filter
        # a prefix/suffix matcher: approximate with its prefix subtree (only used for deny)
        return intersect(self.prefix + "#", topic_filter)


class _Identity:
    __slots__ = ("read_cache", "rules", "write_cache")

    def __init__(self, rules: list[_Rule]) -> None:
        self.rules = rules
        self.read_cache: dict[str, bool] = {}
        self.write_cache: dict[str, bool] = {}

    def decide(self, topic: str, op: Access, cache: dict[str, bool]) -> bool:
        hit = cache.get(topic)
        if hit is not None:
            return hit
        result = False
        for rule in self.rules:
            if (rule.access & op or rule.access is Access.DENY) and rule.matches(topic):
                result = rule.access is not Access.DENY
                break
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[topic] = result
        return result

    def may_subscribe(self, topic_filter: str) -> bool:
        """Whether the filter can match some topic this identity may read: the first read
        rule overlapping the filter whose overlap no earlier deny rule covers grants it.
        What the filter matches beyond that is filtered per message at delivery."""
        denies: list[_Rule] = []
        for rule in self.rules:
            if rule.access is Access.DENY:
                if rule.covers(topic_filter):
                    return False  # every topic the filter can match is denied
                if rule.overlap(topic_filter) is not None:
                    denies.append(rule)
            elif rule.access & Access.READ:
                overlap = rule.overlap(topic_filter)
                if overlap is not None and not any(d.covers(overlap) for d in denies):
                    return True
        return False


def role_defaults(prefix: str) -> list[tuple[str, Access, str | None, str, str]]:
    """The built-in rules per role: (role, access, filter, or prefix + suffix matcher).

    operator: read everything under ``<prefix>/``; engineer: that, plus write tag setpoints
    (``<prefix>/tags/<path>/set``) and signal blocks (``<prefix>/signals/...``); admin: readwrite
    on every topic that does not start with ``$``. Every role may also use
    ``<prefix>/replies/<user>/#`` (``%u``) as its own MQTT 5 response topics.
    """
    p = prefix.rstrip("/")
    return [
        ("operator", Access.READWRITE, f"{p}/replies/%u/#", "", ""),
        ("engineer", Access.READWRITE, f"{p}/replies/%u/#", "", ""),
        ("operator", Access.READ, f"{p}/#", "", ""),
        ("engineer", Access.READ, f"{p}/#", "", ""),
        ("engineer", Access.WRITE, None, f"{p}/tags/", "/set"),
        ("engineer", Access.WRITE, f"{p}/signals/#", "", ""),
        ("admin", Access.READWRITE, "#", "", ""),
    ]


class Acl:
    """Compiled access rules with per-identity decision caches (the broker asks per message)."""

    def __init__(
        self,
        rules: Sequence[AclRule] = (),
        *,
        anonymous_user: str | None = None,
        users: Any = None,
        prefix: str | None = None,
        acl_file: Path | None = None,
    ) -> None:
        """``users`` (a UserDB) enables role matching and, with ``prefix``, the role defaults;
        ``acl_file`` rules follow ``rules`` and are re-read by :meth:`reload`."""
        self.anonymous_user = anonymous_user
        self.users = users
        self.prefix = prefix
        self.acl_file = acl_file
        self._inline = tuple(rules)
        self._file_rules = load_acl_file(acl_file) if acl_file is not None else ()
        self._identities: dict[tuple[str | None, str], _Identity] = {}

    @classmethod
    def from_config(cls, cfg: Any, users: Any = None) -> Acl:
        """Build from the broker's MqttConfig, reading what it offers (``cfg.auth.acl``,
        ``cfg.auth.acl_file``, ``cfg.auth.anonymous_user``, ``cfg.topic_prefix``...)."""
        auth = getattr(cfg, "auth", None)

        def pick(*names: str, default: Any = None) -> Any:
            for owner in (auth, cfg):
                for name in names:
                    value = getattr(owner, name, None)
                    if value is not None:
                        return value
            return default

        role_defaults_on = pick("role_defaults", default=True)
        prefix = pick("topic_prefix", "prefix", "bridge_prefix", default="iotserver")
        return cls(
            tuple(pick("acl", "acl_rules", default=())),
            anonymous_user=pick("anonymous_user"),
            users=users,
            prefix=prefix if role_defaults_on else None,
            acl_file=pick("acl_file"),
        )

    @property
    def rules(self) -> tuple[AclRule, ...]:
        return self._inline + self._file_rules

    def reload(self) -> None:
        """Re-read the ACL file and forget every cached decision (user roles may have changed).

        A broken file raises AclError and leaves the previous rules in force (the caches are
        cleared all the same, so changed roles in a reloaded user file still apply).
        """
        try:
            if self.acl_file is not None:
                self._file_rules = load_acl_file(self.acl_file)
        finally:
            self._identities.clear()

    # -- queries --------------------------------------------------------------------------
    def can_publish(self, user: str | None, client_id: str, topic: str) -> bool:
        ident = self._identity(user, client_id)
        return ident.decide(topic, Access.WRITE, ident.write_cache)

    def can_receive(self, user: str | None, client_id: str, topic: str) -> bool:
        ident = self._identity(user, client_id)
        return ident.decide(topic, Access.READ, ident.read_cache)

    def can_subscribe(self, user: str | None, client_id: str, topic_filter: str) -> bool:
        if not is_valid_topic_filter(topic_filter):
            return False
        try:
            shared = parse_shared(topic_filter)
        except ValueError:
            return False
        if shared is not None:
            topic_filter = shared[1]
        return self._identity(user, client_id).may_subscribe(topic_filter)

    def can_read_topic(self, user: str | None, client_id: str, topic: str) -> bool:
        """``can_receive`` for a topic name checked for validity first (for tools)."""
        return is_valid_topic_name(topic) and self.can_receive(user, client_id, topic)

    # -- compilation ----------------------------------------------------------------------
    def _identity(self, user: str | None, client_id: str) -> _Identity:
        key = (user, client_id)
        ident = self._identities.get(key)
        if ident is None:
            if len(self._identities) >= _IDENTITY_LIMIT:
                del self._identities[next(iter(self._identities))]
            ident = self._identities[key] = _Identity(self._compile(user, client_id))
        return ident

    def _role_of(self, user: str | None) -> str | None:
        if user is None or self.users is None:
            return None
        entry = self.users.get(user)
        if entry is None:
            return None
        role = getattr(entry, "role", None)
        return getattr(role, "value", role)

    def _compile(self, user: str | None, client_id: str) -> list[_Rule]:
        name = user if user is not None else self.anonymous_user
        role = self._role_of(user)
        out: list[_Rule] = []
        for rule in self.rules:
            if rule.user is not None and rule.user != name:
                continue
            if rule.client is not None and rule.client != client_id:
                continue
            if rule.role is not None and rule.role != role:
                continue
            topic = _substitute(rule.topic, name, client_id)
            if topic is None:
                if rule.access is Access.DENY:
                    out.append(_Rule(Access.DENY, match_all=True))  # fail closed
                continue
            out.append(_Rule(rule.access, topic))
        if self.prefix is not None and role is not None:
            for r_role, access, topic_filter, prefix, suffix in role_defaults(self.prefix):
                if r_role != role:
                    continue
                if topic_filter is not None:
                    topic_filter = _substitute(topic_filter, name, client_id)
                    if topic_filter is None:
                        continue
                out.append(_Rule(access, topic_filter, prefix=prefix, suffix=suffix))
        return out
