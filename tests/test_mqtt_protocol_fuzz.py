"""Random packet sequences and random bytes against the broker: whatever a client sends, the
broker never logs an internal error, never lets one client break another, and keeps its
bookkeeping within its limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers.mqtt_harness import Harness, props
from twisted.logger import globalLogPublisher

from iotserver.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Disconnect,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
)


@pytest.fixture
def failures() -> Iterator[list[Any]]:
    seen: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


_levels = st.sampled_from(["a", "b", "+", "#", "$SYS", ""])
_filters = st.lists(_levels, min_size=1, max_size=3).map("/".join)
_topics = st.lists(st.sampled_from(["a", "b", "c", ""]), min_size=1, max_size=3).map("/".join)
_pids = st.integers(1, 6)
_publish = st.builds(
    lambda topic, qos, pid, retain, payload, alias, expiry: Publish(
        topic if topic or alias else "a", payload, qos, retain, False, pid if qos else None,
        props(topic_alias=alias, message_expiry_interval=expiry)),
    _topics, st.integers(0, 2), _pids, st.booleans(), st.binary(max_size=8),
    st.none() | st.integers(1, 3), st.none() | st.integers(0, 3))
_subscribe = st.builds(
    lambda f, qos, nl, rap, rh, pid: Subscribe(pid, ((f, SubscriptionOptions(
        qos, nl and not f.startswith("$share/"), rap, rh)),)),
    _filters | _filters.map(lambda f: "$share/g/" + f), st.integers(0, 2), st.booleans(),
    st.booleans(), st.integers(0, 2), _pids)
_packet = st.one_of(
    _publish, _subscribe,
    st.builds(lambda f, pid: Unsubscribe(pid, (f,)), _filters, _pids),
    st.builds(Puback, _pids), st.builds(Pubrec, _pids), st.builds(Pubrel, _pids),
    st.builds(Pubcomp, _pids), st.just(Pingreq()))
_steps = st.lists(st.tuples(st.integers(0, 2), st.one_of(_packet, st.floats(0, 3),
                                                          st.binary(min_size=1, max_size=6))),
                  max_size=40)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_random_traffic_never_breaks_the_broker(failures: list[Any],
                                                steps: list[tuple[int, Any]]) -> None:
    h = Harness(max_inflight=3, max_queued_messages=4, topic_alias_maximum=3,
                receive_maximum=4)
    clients = [h.connect("v5", MQTT_5, clean=False, props=props(session_expiry_interval=9,
                                                                topic_alias_maximum=2,
                                                                receive_maximum=2)),
               h.connect("v4", MQTT_3_1_1, clean=False),
               h.connect("raw", MQTT_5)]
    for who, step in steps:
        c = clients[who]
        if c.closed:
            clients[who] = c = h.connect(f"again{who}{len(h.broker.sessions)}", c.version)
        if isinstance(step, float):
            h.advance(step)
        elif isinstance(step, bytes):
            if who == 2:
                c.send_raw(step)
        else:
            try:
                c.send(step)
            except (ValueError, TypeError):
                continue  # the codec refuses to encode it: nothing reaches the broker
        for other in clients:
            other.packets()  # the client side decodes whatever the broker wrote
    for session in h.broker.sessions.values():
        window = 3 if session.conn is None else session.conn.send_window
        assert len(session.inflight) <= max(window, 3)
        assert len(session.queue) <= 4
        assert session.queued_bytes >= 0 and session.queued_qos0 >= 0
    for c in clients:
        c.send(Disconnect())
    assert failures == []
