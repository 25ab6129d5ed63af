"""Retained messages (MQTT 3.3.1.3): one per topic, found by topic filter on SUBSCRIBE.

Kept in a topic-level trie so a filter visits only the branches it can match (a plant retains
thousands of tag topics; a subscription to ``site/line1/#`` must not scan all of them).
"""

from __future__ import annotations

from typing import Any, Protocol

from iotserver.mqtt.session import Message


class RetainedSource(Protocol):
    """Answers for the retained messages under a topic prefix (``Broker.add_retained_source``)."""

    def retained_match(self, topic_filter: str) -> list[Message]:
        """The current retained messages whose topics the filter matches."""
        ...

    def retained_count(self) -> int: ...


class RetainedStore:
    """Retained messages in a topic-level trie: a filter visits only the branches it matches."""

    __slots__ = ("_root", "bytes", "by_topic")

    def __init__(self) -> None:
        self._root: list[Any] = [{}, None]  # node: [children by level, Message | None]
        self.by_topic: dict[str, Message] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.by_topic)

    def get(self, topic: str) -> Message | None:
        return self.by_topic.get(topic)

    def set(self, msg: Message) -> None:
        node = self._root
        for level in msg.topic.split("/"):
            child = node[0].get(level)
            if child is None:
                child = node[0][level] = [{}, None]
            node = child
        old = node[1]
        if old is not None:
            self.bytes -= len(old.payload)
        node[1] = msg
        self.by_topic[msg.topic] = msg
        self.bytes += len(msg.payload)

    def remove(self, topic: str) -> Message | None:
        msg = self.by_topic.pop(topic, None)
        if msg is None:
            return None
        self.bytes -= len(msg.payload)
        path = []
        node = self._root
        for level in topic.split("/"):
            path.append((node, level))
            node = node[0][level]
        node[1] = None
        for parent, level in reversed(path):  # prune empty branches
            child = parent[0][level]
            if child[0] or child[1] is not None:
                break
            del parent[0][level]
        return msg

    def match(self, topic_filter: str) -> list[Message]:
        """Retained messages whose topic the filter matches (MQTT 4.7, incl. MQTT-4.7.2-1)."""
        levels = topic_filter.split("/")
        out: list[Message] = []
        last = len(levels)

        def walk(node: list[Any], i: int) -> None:
            if i == last:
                if node[1] is not None:
                    out.append(node[1])
                return
            level = levels[i]
            if level == "#":
                if i and node[1] is not None:
                    out.append(node[1])  # "a/#" matches "a" (4.7.1.2)
                stack = [(c, i == 0 and name.startswith("$")) for name, c in node[0].items()]
                while stack:
                    child, skip = stack.pop()
                    if skip:
                        continue
                    if child[1] is not None:
                        out.append(child[1])
                    stack.extend((c, False) for c in child[0].values())
            elif level == "+":
                for name, child in node[0].items():
                    if i == 0 and name.startswith("$"):
                        continue
                    walk(child, i + 1)
            else:
                child = node[0].get(level)
                if child is not None:
                    walk(child, i + 1)

        walk(self._root, 0)
        return out
