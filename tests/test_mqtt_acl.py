"""ACL: first-match rules, %u/%c substitution and injection, subscription coverage, roles."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotserver.mqtt.acl import (
    Access,
    Acl,
    AclError,
    AclRule,
    covers,
    intersect,
    load_acl_file,
)
from iotserver.mqtt.topics import matches
from iotserver.security.users import Role, User, UserDB

R = Access.READ
W = Access.WRITE
RW = Access.READWRITE
D = Access.DENY


def acl(*rules: AclRule, **kw: object) -> Acl:
    return Acl(rules, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- filter algebra


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("sensors/#", "sensors/+/temp", True),
        ("sensors/#", "sensors", True),  # '#' includes the parent level
        ("sensors/#", "#", False),
        ("sensors/#", "sensors/#", True),
        ("sensors/+", "sensors/#", False),
        ("sensors/+", "sensors/a", True),
        ("sensors/+", "sensors/+", True),
        ("sensors/a", "sensors/+", False),
        ("sensors/+/temp", "sensors/a/temp", True),
        ("sensors/+/temp", "sensors/a/temp/x", False),
        ("#", "$SYS/#", False),  # MQTT-4.7.2-1
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker", True),
        ("#", "+/x", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("+/#", "#", True),  # both match every topic of one level or more
        ("a/+/#", "a/#", False),  # 'a/#' also matches 'a'
        ("+/+/#", "#", False),
    ],
)
def test_covers(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a/#", "a", "a"),
        ("a/#", "+/b", "a/b"),
        ("a/+", "a/b", "a/b"),
        ("a/+", "b/+", None),
        ("#", "$SYS/x", None),
        ("a/b/c", "a/b", None),
        ("#", "#", "#"),
        ("a/#", "#", "a/#"),
        ("+/+", "a/#", "a/+"),
    ],
)
def test_intersect(a: str, b: str, expected: str | None) -> None:
    assert intersect(a, b) == expected
    assert intersect(b, a) == expected


_levels = st.sampled_from(["a", "b", "$s", "+"])
_filters = st.builds(
    lambda lv, hash_: "/".join([*lv, "#"] if hash_ else lv) if lv or hash_ else "a",
    st.lists(_levels, min_size=0, max_size=3),
    st.booleans(),
)
_topics = st.lists(st.sampled_from(["a", "b", "$s", "c"]), min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(_filters, _filters, _topics)
def test_covers_and_intersect_agree_with_matches(f: str, g: str, topic: str) -> None:
    """covers() is never too generous and intersect() is the exact conjunction (on samples)."""
    if covers(f, g) and matches(g, topic):
        assert matches(f, topic)
    both = matches(f, topic) and matches(g, topic)
    common = intersect(f, g)
    assert both == (common is not None and matches(common, topic))


# --------------------------------------------------------------------------- decisions


def test_default_deny() -> None:
    a = acl()
    assert not a.can_publish("alice", "c1", "x")
    assert not a.can_receive("alice", "c1", "x")
    assert not a.can_subscribe("alice", "c1", "x")


def test_access_kinds() -> None:
    a = acl(
        AclRule("r/#", R),
        AclRule("w/#", W),
        AclRule("rw/#", RW),
    )
    assert a.can_receive("u", "c", "r/x") and not a.can_publish("u", "c", "r/x")
    assert a.can_publish("u", "c", "w/x") and not a.can_receive("u", "c", "w/x")
    assert a.can_publish("u", "c", "rw/x") and a.can_receive("u", "c", "rw/x")


def test_first_match_wins() -> None:
    a = acl(
        AclRule("plant/secret/#", D),
        AclRule("plant/#", R),
    )
    assert a.can_receive("u", "c", "plant/line1")
    assert not a.can_receive("u", "c", "plant/secret/key")
    # reversed order: the broad read rule matches first and grants
    b = acl(AclRule("plant/#", R), AclRule("plant/secret/#", D))
    assert b.can_receive("u", "c", "plant/secret/key")


def test_rule_not_granting_the_operation_is_skipped() -> None:
    """A read rule does not stop the search for a write grant further down."""
    a = acl(AclRule("a/#", R), AclRule("a/#", W))
    assert a.can_publish("u", "c", "a/b")


def test_subject_matching() -> None:
    a = acl(
        AclRule("alice/#", RW, user="alice"),
        AclRule("plc/#", W, client="plc-7"),
        AclRule("both/#", R, user="bob", client="bob-tablet"),
        AclRule("public/#", R),
    )
    assert a.can_publish("alice", "any", "alice/x")
    assert not a.can_publish("bob", "any", "alice/x")
    assert a.can_publish(None, "plc-7", "plc/x")
    assert not a.can_publish(None, "plc-8", "plc/x")
    assert a.can_receive("bob", "bob-tablet", "both/x")
    assert not a.can_receive("bob", "bob-phone", "both/x")
    assert a.can_receive(None, "whoever", "public/x")


def test_anonymous_user_name() -> None:
    a = acl(AclRule("guest/#", R, user="anonymous"), anonymous_user="anonymous")
    assert a.can_receive(None, "c", "guest/x")
    assert not acl(AclRule("guest/#", R, user="anonymous")).can_receive(None, "c", "guest/x")


# --------------------------------------------------------------------------- %u / %c


def test_substitution() -> None:
    a = acl(
        AclRule("users/%u/#", RW),
        AclRule("devices/%c/#", W),
        AclRule("mix/%u/%c", R),
    )
    assert a.can_publish("alice", "c1", "users/alice/inbox")
    assert not a.can_publish("alice", "c1", "users/bob/inbox")
    assert a.can_publish("x", "dev1", "devices/dev1/state")
    assert not a.can_publish("x", "dev1", "devices/dev2/state")
    assert a.can_receive("alice", "c1", "mix/alice/c1")
    assert not a.can_receive(None, "c1", "users/None/x")  # no user: %u rules never grant


@pytest.mark.parametrize("evil", ["+", "#", "a/b", "a+b", "x#", "$SYS", "", "../x"])
def test_injection_through_client_id_never_widens(evil: str) -> None:
    a = acl(AclRule("devices/%c/#", RW))
    for topic in ("devices/a/b", "devices/x/state", "devices/+/x", "devices/#"):
        assert not a.can_publish("u", evil, topic) or topic == f"devices/{evil}/x"
    assert not a.can_subscribe("u", evil, "devices/#")
    assert not a.can_subscribe("u", evil, "devices/+/state")


def test_injection_user_with_wildcard() -> None:
    a = acl(AclRule("users/%u/#", R))
    assert not a.can_subscribe("+", "c", "users/+/#")
    assert not a.can_receive("+", "c", "users/bob/x")
    assert not a.can_receive("a/b", "c", "users/a/b/x")  # '/' in a name is refused, not split
    assert a.can_receive("bob", "c", "users/bob/x")


def test_refused_substitution_in_deny_rule_fails_closed() -> None:
    a = acl(AclRule("private/%u/#", D), AclRule("#", R))
    assert a.can_receive("bob", "c", "public/x")
    assert not a.can_receive("bob", "c", "private/bob/x")
    # '#' as a user name cannot be substituted: the deny rule then denies everything
    assert not a.can_receive("#", "c", "public/x")
    assert not a.can_subscribe("#", "c", "public/#")


# --------------------------------------------------------------------------- subscribe


def test_subscribe_filter_must_reach_a_readable_topic() -> None:
    a = acl(AclRule("sensors/#", R))
    assert a.can_subscribe("u", "c", "sensors/+/temp")
    assert a.can_subscribe("u", "c", "sensors/#")
    assert a.can_subscribe("u", "c", "sensors")
    # wider filters are granted: the broker delivers only what the rules let them read
    assert a.can_subscribe("u", "c", "#")
    assert a.can_subscribe("u", "c", "+/temp")
    assert not a.can_receive("u", "c", "other/temp")
    assert not a.can_subscribe("u", "c", "other/#")  # nothing readable there
    assert a.can_subscribe("u", "c", "+")  # "sensors" itself: "#" matches its parent level
    assert not a.can_subscribe("u", "c", "sensors/#/x")  # invalid filter


def test_wildcards_overlapping_a_deny_are_granted() -> None:
    a = acl(AclRule("test/nosubscribe", D), AclRule("#", RW))
    for topic_filter in ("#", "+/+", "test/+", "test/#"):
        assert a.can_subscribe("u", "c", topic_filter), topic_filter
    assert not a.can_receive("u", "c", "test/nosubscribe")  # filtered at delivery
    assert a.can_receive("u", "c", "test/other")
    # a filter that only matches denied topics is still refused
    assert not a.can_subscribe("u", "c", "test/nosubscribe")
    b = acl(AclRule("secret/#", D), AclRule("#", R))
    assert not b.can_subscribe("u", "c", "secret/+/x")
    assert not b.can_subscribe("u", "c", "secret/#")
    assert b.can_subscribe("u", "c", "+/+/x")


def test_subscribe_write_only_rule_does_not_grant() -> None:
    assert not acl(AclRule("a/#", W)).can_subscribe("u", "c", "a/b")


def test_subscribe_with_earlier_deny() -> None:
    a = acl(AclRule("plant/secret/#", D), AclRule("plant/#", R))
    assert a.can_subscribe("u", "c", "plant/line1/#")
    assert a.can_subscribe("u", "c", "plant/#")  # plant/secret/... is filtered at delivery
    assert a.can_subscribe("u", "c", "plant/+/key")
    assert not a.can_subscribe("u", "c", "plant/secret/+")
    assert not a.can_receive("u", "c", "plant/secret/key")
    # an earlier read rule inside the denied subtree keeps that part readable
    b = acl(AclRule("plant/secret/public/#", R), AclRule("plant/secret/#", D), AclRule("#", R))
    assert b.can_subscribe("u", "c", "plant/secret/public/+")
    assert b.can_subscribe("u", "c", "plant/secret/+")  # plant/secret/public is readable
    assert not b.can_subscribe("u", "c", "plant/secret/hidden/+")


def test_subscribe_deny_after_grant_is_irrelevant() -> None:
    a = acl(AclRule("a/#", R), AclRule("a/b", D))
    assert a.can_subscribe("u", "c", "a/#")


def test_subscribe_shared() -> None:
    a = acl(AclRule("jobs/#", R))
    assert a.can_subscribe("u", "c", "$share/workers/jobs/+")
    assert a.can_subscribe("u", "c", "$share/workers/#")  # delivers jobs/... only
    assert not a.can_subscribe("u", "c", "$share/workers/other/#")


def test_dollar_topics_need_explicit_rules() -> None:
    a = acl(AclRule("#", RW))
    assert not a.can_receive("u", "c", "$SYS/broker/uptime")
    assert not a.can_subscribe("u", "c", "$SYS/#")
    b = acl(AclRule("$SYS/#", R))
    assert b.can_subscribe("u", "c", "$SYS/broker/+")


# --------------------------------------------------------------------------- roles


@pytest.fixture
def users() -> UserDB:
    return UserDB(
        users={
            "olga": User("olga", Role.OPERATOR),
            "erik": User("erik", Role.ENGINEER),
            "ada": User("ada", Role.ADMIN),
        }
    )


def test_role_defaults(users: UserDB) -> None:
    a = Acl((), users=users, prefix="iotserver")
    # operator: read-only
    assert a.can_subscribe("olga", "c", "iotserver/tags/#")
    assert a.can_receive("olga", "c", "iotserver/tags/Line1/Temp")
    assert not a.can_publish("olga", "c", "iotserver/tags/Line1/Setpoint/set")
    # engineer: may write setpoints at any depth, but not spoof a tag's value topic
    assert a.can_publish("erik", "c", "iotserver/tags/Line1/Setpoint/set")
    assert a.can_publish("erik", "c", "iotserver/tags/A/B/C/D/set")
    assert not a.can_publish("erik", "c", "iotserver/tags/Line1/Setpoint")
    assert not a.can_publish("erik", "c", "iotserver/tags/set")  # no tag path
    assert a.can_publish("erik", "c", "iotserver/signals/Plant/Vib")
    assert a.can_subscribe("erik", "c", "#")  # granted; delivers iotserver/... only
    assert not a.can_receive("erik", "c", "other/topic")
    assert not a.can_subscribe("erik", "c", "other/#")
    # admin: everything that is not a $ topic
    assert a.can_subscribe("ada", "c", "#")
    assert a.can_publish("ada", "c", "anything/at/all")
    # every role has its own reply topics (MQTT 5 response topics), not the others'
    assert a.can_publish("olga", "c", "iotserver/replies/olga/1")
    assert a.can_subscribe("olga", "c", "iotserver/replies/olga/#")
    assert not a.can_publish("olga", "c", "iotserver/replies/erik/1")
    assert a.can_publish("erik", "c", "iotserver/replies/erik/x")
    # unknown users and anonymous clients get nothing from role defaults
    assert not a.can_receive("mallory", "c", "iotserver/tags/x")
    assert not a.can_receive(None, "c", "iotserver/tags/x")


def test_explicit_rules_come_before_role_defaults(users: UserDB) -> None:
    a = Acl((AclRule("iotserver/tags/Secret/#", D, role="engineer"),), users=users,
            prefix="iotserver")
    assert not a.can_publish("erik", "c", "iotserver/tags/Secret/x/set")
    assert a.can_publish("erik", "c", "iotserver/tags/Open/x/set")
    assert a.can_subscribe("erik", "c", "iotserver/tags/#")  # Secret filtered at delivery
    assert not a.can_receive("erik", "c", "iotserver/tags/Secret/x")
    assert not a.can_subscribe("erik", "c", "iotserver/tags/Secret/#")
    assert a.can_subscribe("olga", "c", "iotserver/tags/#")  # the rule is for engineers only


def test_reload_forgets_cached_roles(users: UserDB) -> None:
    a = Acl((), users=users, prefix="iotserver")
    assert not a.can_publish("olga", "c", "iotserver/tags/x/set")
    users._users["olga"] = User("olga", Role.ENGINEER)
    assert not a.can_publish("olga", "c", "iotserver/tags/x/set")  # cached until reload
    a.reload()
    assert a.can_publish("olga", "c", "iotserver/tags/x/set")


# --------------------------------------------------------------------------- file


def test_acl_file(tmp_path: Path) -> None:
    path = tmp_path / "acl.toml"
    path.write_text(
        """
# comment
[[acl]]
user = "alice"
topic = "alice/#"
access = "readwrite"

[[acl]]
topic = "devices/%c/#"
access = "write"
"""
    )
    a = Acl(acl_file=path)
    assert a.can_publish("alice", "c", "alice/x")
    assert a.can_publish(None, "d1", "devices/d1/x")
    assert len(a.rules) == 2
    # reload picks up changes; a broken file keeps the previous rules
    path.write_text('[[acl]]\ntopic = "other/#"\naccess = "read"\n')
    a.reload()
    assert not a.can_publish("alice", "c", "alice/x")
    assert a.can_receive("x", "c", "other/y")
    path.write_text('[[acl]]\ntopic = "a/#/b"\naccess = "read"\n')
    ident = a._identity("x", "c")
    with pytest.raises(AclError, match=r"acl\.toml:2: acl\[0\]\.topic"):
        a.reload()
    assert a.can_receive("x", "c", "other/y")
    assert a._identity("x", "c") is not ident  # caches dropped anyway (roles may have changed)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[acl]]\ntopic = "a"\naccess = "all"\n', "access: expected one of"),
        ('[[acl]]\ntopic = "a"\n', "access: is required"),
        ('[[acl]]\ntopic = "a"\naccess = "read"\nrole = "boss"\n', "role: expected one of"),
        ('[[acl]]\ntopic = "a"\naccess = "read"\nuser_name = "x"\n', "user_name: unknown key"),
        ('[[acl]]\ntopic = "$share/g/a"\naccess = "read"\n', "topic: rules name the topics"),
        ('[rules]\n', "rules: unknown key"),
        ("[[acl]\n", "acl.toml"),
    ],
)
def test_acl_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "acl.toml"
    path.write_text(text)
    with pytest.raises(AclError, match=message):
        load_acl_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AclError, match="not found"):
        Acl(acl_file=tmp_path / "nope.toml")


def test_rule_validation() -> None:
    with pytest.raises(AclError):
        AclRule("a/#/b", R)
    AclRule("devices/%c/#", R)  # placeholders are fine


def test_from_config_defensive(users: UserDB) -> None:
    class Auth:
        allow_anonymous = True
        anonymous_user = "anonymous"
        acl = (AclRule("guest/#", R, user="anonymous"),)
        acl_file = None

    class Cfg:
        auth = Auth()
        topic_prefix = "plant"

    a = Acl.from_config(Cfg(), users)
    assert a.can_receive(None, "c", "guest/x")
    assert a.can_receive("olga", "c", "plant/tags/x")
    b = Acl.from_config(object())  # nothing configured: default deny
    assert not b.can_receive("olga", "c", "iotserver/tags/x")


def test_decision_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import iotserver.mqtt.acl as acl_module

    monkeypatch.setattr(acl_module, "_CACHE_LIMIT", 4096)
    a = acl(AclRule("t/#", R))
    for i in range(10_000):
        assert a.can_receive("u", "c", f"t/{i}")
    ident = a._identity("u", "c")
    assert len(ident.read_cache) <= 4096


# --------------------------------------------------------------------------- subscribe vs delivery

_LEVELS = ("a", "b")
# every topic of up to 4 levels over a, b and c (c: a level no rule or filter names)
_UNIVERSE = ["/".join(p) for n in range(1, 5)
             for p in __import__("itertools").product(("a", "b", "c"), repeat=n)]


@st.composite
def _small_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from((*_LEVELS, "+")), min_size=0, max_size=3))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


_rules = st.lists(st.tuples(_small_filters(), st.sampled_from([R, W, RW, D])), max_size=4)


@settings(max_examples=400, deadline=None)
@given(_rules, _small_filters())
def test_subscribe_is_granted_exactly_when_delivery_can_pass(
        rules: list[tuple[str, Access]], topic_filter: str) -> None:
    """A filter is granted when some topic it matches is readable (delivery checks each
    message with can_receive), refused when none is; with one deny rule at most the
    filter check is exact, with more it may grant a filter whose readable part several
    denies cover together (harmless: delivery still refuses every message)."""
    a = acl(*(AclRule(t, access) for t, access in rules))
    readable = [t for t in _UNIVERSE if matches(topic_filter, t) and a.can_receive("u", "c", t)]
    granted = a.can_subscribe("u", "c", topic_filter)
    if readable:
        assert granted, (rules, topic_filter, readable[:3])
    elif sum(access is D for _, access in rules) <= 1:
        assert not granted, (rules, topic_filter)
