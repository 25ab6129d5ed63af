"""Topic names, topic filters, shared subscriptions and a subscription trie (MQTT 5.0 section 4.7,
4.8.2; 3.1.1 section 4.7).

Pure functions and one data structure; no I/O. Validation raises ``TopicError`` (a ValueError).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_TOPIC_BYTES = 65535  # a UTF-8 Encoded String holds at most 65535 bytes (MQTT-4.7.3-3)
SHARE_PREFIX = "$share/"


class TopicError(ValueError):
    """An invalid topic name, topic filter or shared subscription filter."""


def _check_string(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    if not text:
        raise TopicError(f"{what} must be at least one character long")  # MQTT-4.7.3-1
    if "\x00" in text:
        raise TopicError(f"{what} must not contain U+0000")  # MQTT-4.7.3-2
    # a str's UTF-8 size is at most 4 bytes per character: only long strings need encoding
    if len(text) > MAX_TOPIC_BYTES // 4:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates (MQTT-1.5.4-1)
            raise TopicError(f"{what} is not valid UTF-8") from None
        if size > MAX_TOPIC_BYTES:
            raise TopicError(f"{what} is longer than 65535 bytes")  # MQTT-4.7.3-3


def validate_topic_name(name: str) -> None:
    """Raise TopicError unless ``name`` may be published to (no wildcards, MQTT-3.3.2-2)."""
    _check_string(name, "topic name")
    if "+" in name or "#" in name:
        raise TopicError(f"topic name {name!r} contains a wildcard")  # MQTT-3.3.2-2, MQTT-4.7.0-1


def validate_topic_filter(topic_filter: str) -> None:
    """Raise TopicError unless ``topic_filter`` is a syntactically valid filter (MQTT-4.7.1).

    ``#`` must be alone in the last level (MQTT-4.7.1-2), ``+`` alone in its level (MQTT-4.7.1-3).
    A ``$share/...`` filter is only checked as a plain filter here; see ``parse_shared``.
    """
    _check_string(topic_filter, "topic filter")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise TopicError(f"'#' must be alone in the last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise TopicError(f"'+' must occupy a whole level: {topic_filter!r}")


def is_valid_topic_name(name: str) -> bool:
    """Boolean form of ``validate_topic_name``."""
    try:
        validate_topic_name(name)
    except (TopicError, TypeError):
        return False
    return True


def is_valid_topic_filter(topic_filter: str) -> bool:
    """Boolean form of ``validate_topic_filter``."""
    try:
        validate_topic_filter(topic_filter)
    except (TopicError, TypeError):
        return False
    return True


def parse_shared(topic_filter: str) -> tuple[str, str] | None:
    """Split ``$share/{group}/{filter}`` into (group, filter); None for a non-shared filter.

    Raises TopicError for a malformed shared filter: the share name must be non-empty and hold
    no ``/``, ``+`` or ``#`` (MQTT-4.8.2-1, MQTT-4.8.2-2) and the filter must be valid.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, sep, rest = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not group or "+" in group or "#" in group:
        raise TopicError(f"invalid share name in {topic_filter!r}")  # MQTT-4.8.2-1/2
    if not sep:
        raise TopicError(f"shared subscription without a topic filter: {topic_filter!r}")
    validate_topic_filter(rest)
    return group, rest


def filter_may_match_prefix(topic_filter: str, prefix: str) -> bool:
    """Whether the (valid) filter can match some topic that starts with ``prefix`` (whole
    levels, ending in "/", e.g. ``iotserver/tags/``)."""
    if prefix.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # MQTT-4.7.2-1
    flevels = topic_filter.split("/")
    plevels = prefix.rstrip("/").split("/")
    for i, p in enumerate(plevels):
        if i >= len(flevels):
            return False  # the filter ends above the prefix
        f = flevels[i]
        if f == "#":
            return True
        if f != "+" and f != p:
            return False
    return len(flevels) > len(plevels)


def matches(topic_filter: str, topic: str) -> bool:
    """True when the (valid) filter matches the (valid) topic name (MQTT 4.7).

    Topics starting with ``$`` are not matched by filters starting with a wildcard (MQTT-4.7.2-1).
    ``a/#`` matches ``a`` too: ``#`` includes the parent level (4.7.1.2).
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    nt = len(tlevels)
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= nt:
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == nt


class _Node(Generic[K, V]):
    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}
        self.subs: dict[K, V] = {}


class TopicTree(Generic[K, V]):
    """Subscription trie: topic filter -> {key: value}; ``match(topic)`` yields every (key, value)
    whose filter matches, in O(topic levels x matching wildcard branches), not O(subscriptions).

    ``key`` identifies a subscriber (a client id, or (group, client) for shared subscriptions);
    one key may appear more than once in a match result when several of its filters match
    (the broker merges them, MQTT-3.3.4-2). Results of ``match`` are cached per topic (bounded,
    flushed on every change), since a plant publishes the same few thousand topics again and again.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self._root: _Node[K, V] = _Node()
        self._count = 0
        self._cache: dict[str, tuple[tuple[K, V], ...]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        """Number of (filter, key) entries."""
        return self._count

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Subscribe ``key`` to ``topic_filter`` with ``value``; True if new, False if replaced."""
        validate_topic_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        new = key not in node.subs
        node.subs[key] = value
        self._count += new
        self._cache.clear()
        return new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Unsubscribe ``key`` from ``topic_filter``; False if it was not subscribed."""
        path: list[tuple[_Node[K, V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if key not in node.subs:
            return False
        del node.subs[key]
        self._count -= 1
        # prune now-empty branches so dead filters cost nothing in match()
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subs or child.children:
                break
            del parent.children[level]
        self._cache.clear()
        return True

    def get(self, topic_filter: str, key: K) -> V | None:
        """The value stored for (filter, key), or None."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.subs.get(key)

    def match(self, topic: str) -> tuple[tuple[K, V], ...]:
        """All (key, value) pairs whose filter matches the topic name."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        result: list[tuple[K, V]] = []
        nodes = [self._root]
        # MQTT-4.7.2-1: no wildcard at the first level matches a topic starting with '$'
        wild = not topic.startswith("$")
        levels = topic.split("/")
        for level in levels:
            found: list[_Node[K, V]] = []
            for node in nodes:
                children = node.children
                if not children:
                    continue
                if wild:
                    hash_node = children.get("#")
                    if hash_node is not None:
                        result.extend(hash_node.subs.items())
                    plus = children.get("+")
                    if plus is not None:
                        found.append(plus)
                exact = children.get(level)
                if exact is not None:
                    found.append(exact)
            if not found:
                break
            nodes = found
            wild = True
        else:
            for node in nodes:
                result.extend(node.subs.items())
                hash_node = node.children.get("#")  # "a/#" matches "a" (4.7.1.2)
                if hash_node is not None:
                    result.extend(hash_node.subs.items())
        out = tuple(result)
        cache = self._cache
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # evict the oldest entry
        cache[topic] = out
        return out

    def filters(self) -> Iterator[tuple[str, K, V]]:
        """Every (filter, key, value) entry, depth first."""
        stack: list[tuple[str | None, _Node[K, V]]] = [(None, self._root)]
        while stack:
            prefix, node = stack.pop()
            if prefix is not None:
                for key, value in node.subs.items():
                    yield prefix, key, value
            for level, child in node.children.items():
                stack.append((level if prefix is None else f"{prefix}/{level}", child))
