"""Listening addresses: one parser from an endpoint string to a typed, frozen :class:`Endpoint`.

Configuration files name listeners with Twisted's endpoint mini-language (``kind:arg:key=value``,
``:`` and ``\\`` escaped with a backslash, as in ``interface=\\:\\:1``). This module is the only
place that reads such a string: ``check-config``, the exposure warnings, the startup summary and
the listeners all go through :func:`parse_endpoint`, so a string that passes ``check-config``
starts, and one that would not start is refused there with the same message.

Kinds and their options (anything else is an error naming the option and what is expected)::

    tcp:PORT[:interface=ADDR][:backlog=N]                  IPv4 (or the address given)
    tcp6:PORT[:interface=ADDR][:backlog=N]                 IPv6, all addresses by default
    tls:PORT[:interface=..][:backlog=..][:cert=PATH:key=PATH][:ca=PATH]
        [:clientAuth=none|optional|required]               ours: TLS with client certificates
    ssl:PORT[:interface=..][:backlog=..]:privateKey=PATH[:certKey=PATH]
                                                           Twisted's TLS listener string
    unix:PATH[:mode=OCTAL][:lockfile=0|1][:backlog=N]      a Unix socket (loopback by nature)
    systemd:domain=INET|INET6|UNIX:index=N                 a socket handed over by systemd

Both ``tls:`` and ``ssl:`` are served with our TLS policy (``iotserver.security.tls``), so
Twisted's ``sslmethod``, ``dhParameters`` and ``extraCertChain`` options are refused: put the
chain after the certificate in the certificate file instead.
"""

from __future__ import annotations

import difflib
import ipaddress
from dataclasses import dataclass

__all__ = ["KINDS", "Endpoint", "EndpointError", "parse_endpoint", "split_description"]

KINDS = ("tcp", "tcp6", "tls", "ssl", "unix", "systemd")
CLIENT_AUTH_MODES = ("none", "optional", "required")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "tls": ("port", "interface", "backlog", "cert", "key", "ca", "clientAuth"),
    "ssl": ("port", "interface", "backlog", "privateKey", "certKey"),
    "unix": ("address", "mode", "lockfile", "backlog"),
    "systemd": ("domain", "index"),
}
_POSITIONAL = {"tcp": "port", "tcp6": "port", "tls": "port", "ssl": "port", "unix": "address"}
_REFUSED_SSL = ("sslmethod", "dhParameters", "extraCertChain")
_LOOPBACK_NAMES = ("localhost",)


class EndpointError(ValueError):
    """An endpoint string that cannot be listened on; the message says what was expected."""


@dataclass(frozen=True)
class Endpoint:
    """One parsed listening address. ``text`` is the string as configured."""

    text: str
    kind: str
    port: int | None = None  #: tcp/tcp6/tls/ssl; 0 means "any free port"
    interface: str = ""  #: "" = every address of the family
    backlog: int = 50
    cert: str | None = None  #: tls: cert=, ssl: certKey= (defaults to privateKey)
    key: str | None = None  #: tls: key=, ssl: privateKey=
    ca: str | None = None  #: tls: CAs that client certificates must chain to
    #: tls: as given (None: not given); without cert= it applies to the [tls] material
    client_auth: str | None = None
    path: str | None = None  #: unix
    mode: int = 0o666  #: unix
    lockfile: bool = True  #: unix
    domain: str | None = None  #: systemd
    index: int | None = None  #: systemd

    @property
    def is_tls(self) -> bool:
        return self.kind in ("tls", "ssl")

    @property
    def host(self) -> str:
        """The address listened on, with the family's wildcard when none was given."""
        if self.interface:
            return self.interface
        return "::" if self.kind == "tcp6" else "0.0.0.0"

    @property
    def loopback(self) -> bool:
        """True when only this host can connect (a loopback address or a Unix socket)."""
        if self.kind == "unix":
            return True
        if self.kind == "systemd":
            return False  # we cannot tell what systemd bound: assume the worst
        host = self.host
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            return False

    @property
    def own_certificate(self) -> bool:
        """The string names its own certificate files (else the server's ``[tls]`` material)."""
        return self.cert is not None

    def with_port(self, port: int) -> str:
        """The description with the real port (after listening on port 0), for the log."""
        if self.port != 0 or self.kind not in _POSITIONAL or self.kind == "unix":
            return self.text
        _, _, rest = self.text.partition(":")
        parts = rest.split(":", 1)
        tail = f":{parts[1]}" if len(parts) > 1 else ""
        return f"{self.kind}:{port}{tail}"

    def where(self) -> str:
        return "loopback only" if self.loopback else "REACHABLE OFF-HOST"


def split_description(text: str) -> list[str]:
    """Split on unescaped ``:``; a backslash escapes the next character (Twisted's rule)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise EndpointError(f"{text!r} ends with a lone backslash")
            current.append(escaped)
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _number(text: str, option: str, lo: int, hi: int, description: str) -> int:
    if not text.isascii() or not text.isdigit() or not lo <= int(text) <= hi:
        raise EndpointError(f"{description!r}: {option} must be a number {lo}..{hi}, "
                            f"got {text!r}")
    return int(text)


def _unknown(kind: str, key: str, description: str) -> EndpointError:
    known = _OPTIONS[kind]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if k.lower() == key.lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return EndpointError(f"{description!r}: unknown option {key!r} for {kind}:{hint}; "
                         f"expected one of {', '.join(known)}")


def parse_endpoint(description: str, kinds: tuple[str, ...] = KINDS, why: str = "") -> Endpoint:
    """Parse a listening address; :class:`EndpointError` says what is wrong and what is expected.

    ``kinds`` narrows the kinds a listener accepts; ``why`` says why (in the error). Only
    syntax and values are checked here; whether files exist and the port is free is found
    out when listening (and reported as one line naming the listener).
    """
    if not isinstance(description, str) or ":" not in description:
        raise EndpointError(
            f"expected a Twisted endpoint string such as 'tcp:1883:interface=127.0.0.1' "
            f"(kinds: {', '.join(KINDS)}), got {description!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in description):
        raise EndpointError(f"{description!r}: control characters are not allowed")
    kind, _, rest = description.partition(":")
    if kind not in KINDS:
        raise EndpointError(
            f"expected a Twisted endpoint string such as 'tcp:1883:interface=127.0.0.1' "
            f"(kinds: {', '.join(KINDS)}), got {description!r}")
    if kind not in kinds:
        raise EndpointError(f"{why or 'this listener cannot use ' + kind + ':'}; expected one "
                            f"of {', '.join(k + ':' for k in kinds)}, got {description!r}")
    options: dict[str, str] = {}
    positional = 0
    for part in split_description(rest):
        key, sep, value = part.partition("=")
        if not sep:
            positional += 1
            name = _POSITIONAL.get(kind)
            if name is None or positional > 1:
                raise EndpointError(f"{description!r}: unexpected positional argument {part!r}")
            key, value = name, part
        if kind == "ssl" and key in _REFUSED_SSL:
            raise EndpointError(f"{description!r}: {key} is not supported (the TLS policy is "
                                "fixed; put a chain after the certificate in its file)")
        if key not in _OPTIONS[kind]:
            raise _unknown(kind, key, description)
        if key in options:
            raise EndpointError(f"{description!r}: option {key!r} given twice")
        options[key] = value
    return _build(description, kind, options)


def _build(description: str, kind: str, o: dict[str, str]) -> Endpoint:
    d = description
    if kind == "systemd":
        for need in ("domain", "index"):
            if need not in o:
                raise EndpointError(f"{d!r}: missing {need}= (systemd:domain=INET:index=0)")
        if o["domain"] not in ("INET", "INET6", "UNIX"):
            raise EndpointError(f"{d!r}: domain must be one of INET, INET6, UNIX, "
                                f"got {o['domain']!r}")
        return Endpoint(d, kind, domain=o["domain"],
                        index=_number(o["index"], "index", 0, 1023, d))
    backlog = _number(o["backlog"], "backlog", 1, 65535, d) if "backlog" in o else 50
    if kind == "unix":
        path = o.get("address", "")
        if not path:
            raise EndpointError(f"{d!r}: missing the socket path (unix:/run/x.sock)")
        mode = 0o666
        if "mode" in o:
            text = o["mode"]
            if not text or any(c not in "01234567" for c in text) or int(text, 8) > 0o777:
                raise EndpointError(f"{d!r}: mode must be octal 000..777, got {text!r}")
            mode = int(text, 8)
        lockfile = o.get("lockfile", "1")
        if lockfile not in ("0", "1"):
            raise EndpointError(f"{d!r}: lockfile must be 0 or 1, got {lockfile!r}")
        return Endpoint(d, kind, backlog=backlog, path=path, mode=mode, lockfile=lockfile == "1")
    if "port" not in o:
        raise EndpointError(f"{d!r}: missing port ({kind}:PORT:...)")
    port_text = o["port"]
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise EndpointError(f"{d!r}: expected a port number 0..65535 after '{kind}:' "
                            f"(port must be a number), got {port_text!r}")
    port = int(port_text)
    interface = o.get("interface", "")
    if "interface" in o and (not interface or any(c.isspace() for c in interface)):
        raise EndpointError(f"{d!r}: interface must be an address such as 127.0.0.1 or ::1, "
                            f"got {interface!r}")
    cert = key = ca = client_auth = None
    if kind == "tls":
        cert, key, ca = o.get("cert"), o.get("key"), o.get("ca")
        client_auth = o.get("clientAuth")
        if client_auth is not None and client_auth not in CLIENT_AUTH_MODES:
            raise EndpointError(f"{d!r}: clientAuth must be one of "
                                f"{', '.join(CLIENT_AUTH_MODES)}, got {client_auth!r}")
        if (cert is None) != (key is None):
            raise EndpointError(f"{d!r}: give cert= and key= together, or neither (the "
                                "server's own certificate of [tls] is used)")
        if cert is None and ca is not None:
            raise EndpointError(f"{d!r}: ca= needs cert= and key=; without them the "
                                "certificate and CA of [tls] are used (on MQTT listeners "
                                "client_certs says whether client certificates are asked)")
        if cert is not None and client_auth in ("optional", "required") and ca is None:
            raise EndpointError(f"{d!r}: clientAuth={client_auth} needs ca=PATH")
    elif kind == "ssl":
        key = o.get("privateKey")
        if key is None:
            raise EndpointError(f"{d!r}: missing privateKey=PATH (or use tls:PORT, which "
                                "serves the certificate of [tls])")
        cert = o.get("certKey", key)
    for name, value in (("cert", cert), ("key", key), ("ca", ca)):
        if value is not None and not value:
            raise EndpointError(f"{d!r}: {name} must be a file path, got ''")
    return Endpoint(d, kind, port=port, interface=interface, backlog=backlog, cert=cert,
                    key=key, ca=ca, client_auth=client_auth)
