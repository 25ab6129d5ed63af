"""Topic names, filters, shared subscriptions, matching (spec examples of MQTT 4.7) and the
subscription trie, checked against the plain ``matches`` function with Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotserver.mqtt.topics import (
    TopicError,
    TopicTree,
    is_valid_topic_filter,
    is_valid_topic_name,
    matches,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)


@pytest.mark.parametrize("name", ["a", "a/b", "/", "/a", "a/", "a//b", "$SYS/x", "ä/ü", " "])
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)
    assert is_valid_topic_name(name)


@pytest.mark.parametrize("name", ["", "a/#", "#", "+", "a/+/b", "a+", "a\x00b",
                                  "x" * 65536, "é" * 32768])
def test_invalid_topic_names(name: str) -> None:
    with pytest.raises(TopicError):
        validate_topic_name(name)
    assert not is_valid_topic_name(name)


def test_topic_name_byte_limit() -> None:
    validate_topic_name("x" * 65535)  # MQTT-4.7.3-3 counts UTF-8 bytes
    validate_topic_name("é" * 32767)
    assert not is_valid_topic_name(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        validate_topic_name(b"a")  # type: ignore[arg-type]


@pytest.mark.parametrize("topic_filter", [
    "#", "+", "a/#", "+/+", "/+", "a/+/b", "+/tennis/#", "$SYS/#", "a//b", "a/+/+/#",
    "sport/tennis/player1/#", "$share/g/a/#",
])
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)
    assert is_valid_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", [
    "", "a#", "a/#/b", "#/a", "a+", "+a/b", "a/b+", "##", "a/b#", "a/++", "a\x00",
    "sport/tennis#",  # 4.7.1.2 example: not valid
    "sport+",  # 4.7.1.3 example: not valid
])
def test_invalid_topic_filters(topic_filter: str) -> None:
    with pytest.raises(TopicError):
        validate_topic_filter(topic_filter)
    assert not is_valid_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter,expected", [
    ("$share/g/a/b", ("g", "a/b")),
    ("$share/consumer1/sport/tennis/+", ("consumer1", "sport/tennis/+")),  # 4.8.2 example
    ("$share/g/#", ("g", "#")),
    ("$share/g//", ("g", "/")),
    ("a/b", None),
    ("$shared/g/a", None),
    ("$share", None),
    ("$SYS/#", None),
])
def test_parse_shared(topic_filter: str, expected: tuple[str, str] | None) -> None:
    assert parse_shared(topic_filter) == expected


@pytest.mark.parametrize("topic_filter", [
    "$share/g", "$share//a", "$share/g+/a", "$share/#/a", "$share/g/", "$share/g/a#",
])
def test_parse_shared_invalid(topic_filter: str) -> None:
    with pytest.raises(TopicError):
        parse_shared(topic_filter)  # MQTT-4.8.2-1, MQTT-4.8.2-2


@pytest.mark.parametrize("topic_filter,topic,expected", [
    # MQTT 5.0 4.7.1.2 examples
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    # 4.7.1.3 examples
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/x", True),
    # 4.7.2: $ topics and wildcards (MQTT-4.7.2-1)
    ("#", "$SYS/broker/clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("a/$x", "a/$x", True),
    ("a/+", "a/$x", True),
    # case sensitivity and exactness
    ("ACCOUNTS", "Accounts", False),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
])
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected
    tree: TopicTree[str, int] = TopicTree()
    tree.add(topic_filter, "k", 1)
    assert (tree.match(topic) == (("k", 1),)) is expected


def test_tree_add_replace_remove() -> None:
    tree: TopicTree[str, int] = TopicTree()
    assert tree.add("a/+", "c1", 1)
    assert tree.add("a/#", "c1", 2)
    assert tree.add("a/b", "c2", 0)
    assert not tree.add("a/b", "c2", 1)  # replaced, not added
    assert len(tree) == 3
    assert sorted(tree.match("a/b")) == [("c1", 1), ("c1", 2), ("c2", 1)]
    assert tree.get("a/b", "c2") == 1
    assert tree.get("a/b", "c9") is None
    assert tree.get("x/y", "c1") is None
    assert sorted(tree.filters()) == [("a/#", "c1", 2), ("a/+", "c1", 1), ("a/b", "c2", 1)]
    assert tree.remove("a/b", "c2")
    assert not tree.remove("a/b", "c2")
    assert not tree.remove("a/x/y", "c1")
    assert sorted(tree.match("a/b")) == [("c1", 1), ("c1", 2)]
    assert tree.remove("a/+", "c1")
    assert tree.remove("a/#", "c1")
    assert len(tree) == 0
    assert tree.match("a/b") == ()
    assert not tree._root.children  # empty branches are pruned


def test_tree_cache_is_invalidated() -> None:
    tree: TopicTree[str, str] = TopicTree(cache_size=2)
    tree.add("a/+", "c1", "v1")
    assert tree.match("a/b") == (("c1", "v1"),)
    tree.add("a/b", "c2", "v2")  # must show up although a/b was cached
    assert sorted(tree.match("a/b")) == [("c1", "v1"), ("c2", "v2")]
    tree.add("a/+", "c1", "v3")
    assert sorted(tree.match("a/b")) == [("c1", "v3"), ("c2", "v2")]
    tree.remove("a/b", "c2")
    assert tree.match("a/b") == (("c1", "v3"),)
    for topic in ("a/1", "a/2", "a/3"):  # the bounded cache evicts and stays correct
        assert tree.match(topic) == (("c1", "v3"),)
    assert len(tree._cache) <= 2


def test_tree_rejects_invalid_filters() -> None:
    tree: TopicTree[str, int] = TopicTree()
    with pytest.raises(TopicError):
        tree.add("a/#/b", "c", 1)
    assert len(tree) == 0


def test_tree_many_subscriptions() -> None:
    tree: TopicTree[int, int] = TopicTree()
    for i in range(10_000):
        tree.add(f"plant/line{i % 100}/machine{i}/temp", i, 0)
    tree.add("plant/+/machine42/#", -1, 1)
    assert sorted(tree.match("plant/line42/machine42/temp")) == [(-1, 1), (42, 0)]
    assert tree.match("plant/line1/machine42/temp") == ((-1, 1),)
    assert tree.match("plant/line1/machine2/temp") == ()


_levels = st.sampled_from(["a", "b", "", "$x", "$SYS"])
_topics = st.lists(_levels, min_size=1, max_size=4).map("/".join)
_filter_levels = st.sampled_from(["a", "b", "", "$x", "$SYS", "+"])


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_filter_levels, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "a"  # "" is not a filter (MQTT-4.7.3-1)


@settings(max_examples=300)
@given(subs=st.lists(st.tuples(_filters(), st.integers(0, 5)), max_size=20),
       removals=st.lists(st.tuples(_filters(), st.integers(0, 5)), max_size=8),
       probes=st.lists(_topics, min_size=1, max_size=8))
def test_tree_agrees_with_matches(subs: list[tuple[str, int]], removals: list[tuple[str, int]],
                                  probes: list[str]) -> None:
    tree: TopicTree[int, str] = TopicTree()
    model: dict[tuple[str, int], str] = {}
    for topic_filter, key in subs:
        tree.add(topic_filter, key, topic_filter)
        model[(topic_filter, key)] = topic_filter
    for topic in probes:  # fill the cache before the removals
        tree.match(topic)
    for topic_filter, key in removals:
        assert tree.remove(topic_filter, key) == ((topic_filter, key) in model)
        model.pop((topic_filter, key), None)
    assert len(tree) == len(model)
    for topic in probes:
        expected = sorted((k, v) for (f, k), v in model.items() if matches(f, topic))
        assert sorted(tree.match(topic)) == expected
