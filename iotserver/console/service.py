"""The SSH console service: twisted.conch on a Twisted endpoint, keys and admin passwords only.

Authentication: public keys listed in the authorized_keys file (re-read at every login, so adding
a key needs no restart; a file writable by others is ignored, as sshd does) and, when
``password_login`` is on, passwords of ``admin`` users from the user file. Both go through the
server's one login module (:mod:`iotserver.security.login`): the same throttle by address and
user, passwords verified in a thread, every attempt logged and audited. The console runs
arbitrary Python as the server, which is exactly what an admin can do; engineers and operators
use the protocols. With neither keys nor passwords nobody can log in: there is no anonymous
or "none" authentication.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

with warnings.catch_warnings():  # conch.checkers imports spwd, deprecated since Python 3.11
    warnings.filterwarnings("ignore", ".*spwd", DeprecationWarning)
    from twisted.conch.checkers import (
        IAuthorizedKeysDB,
        SSHPublicKeyChecker,
        readAuthorizedKeyFile,
    )

from iotserver.console.config import ConsoleConfig
from iotserver.edge.guard import Probe, RateLimitedLog
from iotserver.edge.listen import Listeners
from iotserver.console.session import ConsoleContext, ConsoleRealm
from iotserver.lifecycle import AsyncService, StartupError
from iotserver.security.login import Outcome, logins_of
from iotserver.security.users import Role

log = Logger(namespace="iotserver.console")

# Roles allowed to log in with a password (see module docstring).
CONSOLE_ROLES = frozenset({Role.ADMIN})

DISCONNECT_PROTOCOL_ERROR = 2  # RFC 4253 section 11.1
DISCONNECT_BY_APPLICATION = 11


def _partial(proto: Any) -> bool:
    # conch keeps what it has not parsed in ``buf`` (and a decrypted first block in ``first``)
    return bool(proto.buf) or hasattr(proto, "first")


def _greeted(proto: Any) -> bool:
    # after a successful login conch switches the transport's service to ssh-connection
    return getattr(getattr(proto, "service", None), "name", None) == b"ssh-connection"


#: The guard's view of an SSH connection: a packet (or the version line) is under way while
#: conch holds unparsed bytes; the login grace time ends when a user has authenticated.
PROBE = Probe(partial=_partial, greeted=_greeted)
PROTOCOL = "console"  # in the login log and the audit trail


def load_or_create_host_key(path: Path) -> tuple[keys.Key, bool]:
    """The server's Ed25519 host key; created with mode 0600 on first start."""
    created = False
    try:
        if not path.exists():
            _create_host_key(path)
            created = True
        elif path.stat().st_mode & 0o077:
            log.warn("console host key {path} is readable by others; chmod 600 it",
                     path=str(path))
        return keys.Key.fromFile(str(path)), created
    except (keys.BadKeyError, ValueError, OSError) as exc:
        raise StartupError(f"console host key {path}: {exc}") from None


def _create_host_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = ed25519.Ed25519PrivateKey.generate()
    data = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    public = keys.Key(private).public().toString("openssh")
    path.with_name(path.name + ".pub").write_bytes(public + b" iotserver-console\n")


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Public keys from an OpenSSH authorized_keys file, read at each login attempt.

    Every key listed may log in under any user name (the name is only used in the log).
    Options before the key type (``from=...``) are not supported; such lines are skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def authorized(self) -> list[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & (stat.S_IWGRP | stat.S_IWOTH):
                    log.error("console: {path} is writable by group or others; ignoring it "
                              "(chmod 600)", path=str(self.path))
                    return []
                return list(readAuthorizedKeyFile(f))
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("console: cannot read {path}: {exc}", path=str(self.path), exc=str(exc))
            return []

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        return self.authorized()


def _fingerprint(blob: bytes) -> str:
    try:
        fp: str = keys.Key.fromString(blob).fingerprint(keys.FingerprintFormats.SHA256_BASE64)
        return "SHA256:" + fp.rstrip("=")
    except keys.BadKeyError:
        return "(unreadable key)"


def _peer_of(credentials: Any) -> str:
    return str(getattr(credentials, "peer", "") or "")


@implementer(ICredentialsChecker)
class KeyChecker:
    """Public keys of the authorized_keys file, through the shared login throttle and audit.

    A key offered without a signature (the client asks whether it may use it, RFC 4252 7) is
    answered "yes" only when it is authorized, so clients move on to their next key at once;
    such probes are logged, not counted as failures (agents offer every key they hold). A
    signed attempt with an unauthorized key or a bad signature is a failed login.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, keydb: AuthorizedKeysFile, core: Any) -> None:
        self._keydb = keydb
        self._core = core
        self._checker = SSHPublicKeyChecker(keydb)  # type: ignore[arg-type]

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
        from twisted.conch.error import ValidPublicKey

        logins = logins_of(self._core)
        name = credentials.username.decode("utf-8", "replace")
        peer = _peer_of(credentials)
        fp = _fingerprint(credentials.blob)
        if not credentials.signature:
            try:
                offered = keys.Key.fromString(credentials.blob)
            except keys.BadKeyError:
                return fail(UnauthorizedLogin("unreadable key"))
            if any(k == offered for k in self._keydb.getAuthorizedKeys(credentials.username)):
                return fail(ValidPublicKey())  # conch answers USERAUTH_PK_OK
            logins.ratelog.info("console-key-offered", "console: key {fp} offered for {user!r} "
                                "from {peer} is not authorized", fp=fp, user=name,
                                peer=peer or "?")
            return fail(UnauthorizedLogin("key not authorized"))
        if logins.throttled(PROTOCOL, peer, name, "key"):
            return fail(UnauthorizedLogin("too many failed logins"))
        d: Deferred[bytes] = self._checker.requestAvatarId(credentials)

        def accepted(avatar_id: bytes) -> bytes:
            logins.record(PROTOCOL, peer, name, "key", Outcome.OK, fp)
            return avatar_id

        def refused(failure: Failure) -> Failure:
            if failure.check(UnauthorizedLogin) and not failure.check(ValidPublicKey):
                logins.record(PROTOCOL, peer, name, "key", Outcome.FAILED,
                              f"{fp}: {failure.getErrorMessage()}")
            return failure

        return d.addCallbacks(accepted, refused)


def _console_role(user: Any) -> str:
    if user.role in CONSOLE_ROLES:
        return ""
    return f"role {user.role.value}: only admin may use the console"


@implementer(ICredentialsChecker)
class UserPasswordChecker:
    """Passwords of the user file through the shared login path; only console roles pass."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, core: Any) -> None:
        self._core = core  # core.users may be replaced at start and reloaded: look it up late

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
        name = credentials.username.decode("utf-8", "replace")
        d = logins_of(self._core).check_password(PROTOCOL, _peer_of(credentials), name,
                                                 credentials.password, allow=_console_role)

        def check(result: Any) -> bytes:
            if not result.ok:
                raise UnauthorizedLogin("wrong user name or password")
            return credentials.username  # type: ignore[no-any-return]

        return d.addCallback(check)


def _peer(transport: Any) -> str:
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


class _PeerPortal:
    """The factory's portal, for one connection: credentials carry the client's address
    (``peer``, for the login throttle) and the realm gets ``host:port`` as its mind."""

    def __init__(self, portal: Any, host: str, peer: str) -> None:
        self._portal = portal
        self._host = host
        self._peer = peer

    def listCredentialsInterfaces(self) -> Any:
        return self._portal.listCredentialsInterfaces()

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Any:
        credentials.peer = self._host
        return self._portal.login(credentials, self._peer, *interfaces)


def _factory_class() -> type:
    """The SSH factory (conch's factory module imports the reactor: built on first use)."""
    from twisted.conch.ssh.connection import SSHConnection
    from twisted.conch.ssh.factory import SSHFactory
    from twisted.conch.ssh.transport import SSHServerTransport
    from twisted.conch.ssh.userauth import SSHUserAuthServer

    class ConsoleUserAuth(SSHUserAuthServer):
        def serviceStarted(self) -> None:
            super().serviceStarted()
            transport: Any = self.transport
            peer = transport.transport.getPeer()
            host = str(getattr(peer, "host", "") or "")
            port = getattr(peer, "port", None)
            self.portal = _PeerPortal(self.portal, host,
                                      f"{host}:{port}" if port is not None else host)

    class ConsoleTransport(SSHServerTransport):
        def dataReceived(self, data: bytes) -> None:
            """conch lets a malformed packet raise out of here (a critical traceback in the
            log per packet); such a peer is closed with one rate-limited line instead."""
            try:
                super().dataReceived(data)
            except Exception as exc:
                factory: Any = self.factory
                factory.malformed += 1
                factory.ratelog.warn("malformed", "console: closing {peer}: malformed SSH "
                                     "packet ({exc})", peer=_peer(self.transport),
                                     exc=type(exc).__name__)
                self.buf = b""
                transport: Any = self.transport
                transport.abortConnection()

        def getPacket(self) -> bytes | None:
            payload: bytes | None = super().getPacket()
            if payload is not None and not payload:
                # RFC 4253 section 6: a payload and at least 4 bytes of padding; conch would
                # stop reading at an empty payload and leave the connection hanging
                raise ValueError("empty payload or padding longer than the packet")
            return payload

        def receiveError(self, reason_code: int, description: bytes) -> None:
            # conch logs every client's goodbye as an error; only unusual reasons are news.
            if reason_code == DISCONNECT_BY_APPLICATION:
                return
            log.info("console: client disconnected with code {code}: {text}",
                     code=reason_code, text=description.decode("utf-8", "replace"))

        def connectionLost(self, reason: Failure | None = None) -> None:
            super().connectionLost(reason)
            self.factory.forget(self)  # type: ignore[attr-defined]

    class ConsoleFactory(SSHFactory):
        protocol = ConsoleTransport
        services = {b"ssh-userauth": ConsoleUserAuth, b"ssh-connection": SSHConnection}
        noisy = False  # the listener is logged once by core.listening

        def __init__(self, portal: Any, host_key: keys.Key, clock: Any) -> None:
            self.portal = portal
            self.malformed = 0  # connections closed for a malformed SSH packet
            self.ratelog = RateLimitedLog(clock, logger=log)
            key_type = host_key.sshType()
            self.publicKeys = {key_type: host_key.public()}
            self.privateKeys = {key_type: host_key}
            self.connections: dict[Any, Deferred[None]] = {}

        def __repr__(self) -> str:
            return "<SSH console>"

        def buildProtocol(self, addr: Any) -> Any:
            proto = super().buildProtocol(addr)
            self.connections[proto] = Deferred()
            return proto

        def forget(self, proto: Any) -> None:
            d = self.connections.pop(proto, None)
            if d is not None:
                d.callback(None)

        def disconnect_all(self, clock: Any, grace: float = 2.0) -> Deferred[Any]:
            """Close every connection; abort those that do not close within ``grace`` s."""
            waiting = list(self.connections.values())
            for proto in list(self.connections):
                try:
                    proto.sendDisconnect(DISCONNECT_BY_APPLICATION, b"server shutting down")
                except Exception:
                    proto.transport.loseConnection()

            def abort() -> None:
                for proto in list(self.connections):
                    proto.transport.abortConnection()

            call = clock.callLater(grace, abort)
            done = DeferredList(waiting)
            done.addBoth(lambda _: call.cancel() if call.active() else None)
            return done

    return ConsoleFactory


class ConsoleService(AsyncService):
    """Listens on ``cfg.endpoint`` and serves console sessions until stopped."""

    name = "console"

    def __init__(self, core: Any, cfg: ConsoleConfig) -> None:
        super().__init__()
        self.core = core
        self.cfg = cfg
        self.factory: Any = None
        self.port: Any = None
        self.listeners: Listeners | None = None
        self.context: ConsoleContext | None = None
        self.host_key_fingerprint = ""

    @property
    def sessions(self) -> set[Any]:
        return self.context.sessions if self.context is not None else set()

    async def start(self) -> None:
        from twisted.cred.portal import Portal
        from twisted.internet import reactor

        data_dir = self.core.config.server.data_dir
        host_key_path = self.cfg.host_key_path(data_dir)
        host_key, created = load_or_create_host_key(host_key_path)
        # the form OpenSSH prints when it first connects, so operators can compare
        self.host_key_fingerprint = "SHA256:" + host_key.fingerprint(
            keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
        if created:
            log.info("console: created host key {path}", path=str(host_key_path))
        log.info("console host key fingerprint {fp}", fp=self.host_key_fingerprint)

        authorized = AuthorizedKeysFile(self.cfg.authorized_keys_path(data_dir))
        checkers: list[Any] = [KeyChecker(authorized, self.core)]
        if self.cfg.password_login:
            checkers.append(UserPasswordChecker(self.core))
        clock = self.core.clock if hasattr(self.core.clock, "callLater") else reactor
        self.context = ConsoleContext(self.core, clock)
        portal = Portal(ConsoleRealm(self.context), checkers)  # type: ignore[arg-type]
        self.factory = _factory_class()(portal, host_key, clock)
        self.listeners = Listeners("console", clock, reactor, namespace="iotserver.console")
        listener = await self.listeners.listen("SSH console", self.cfg.ep, self.factory,
                                               self.cfg.limits, probe=PROBE)
        self.port = listener.port
        self.core.listening("SSH console", listener.address)
        self._warn_about_access(authorized)

    def edge_stats(self) -> dict[str, dict[str, int]]:
        """The listener's counters, plus connections closed for malformed SSH packets."""
        if self.listeners is None:
            return {}
        stats = self.listeners.stats()
        for counters in stats.values():
            counters["malformed_packets"] = self.factory.malformed if self.factory else 0
        return stats

    def _warn_about_access(self, authorized: AuthorizedKeysFile) -> None:
        if not self.cfg.ep.loopback:
            log.warn("the SSH console listens on {ep}, reachable from other hosts; it runs "
                     "Python as the server: keep it on loopback unless you need it",
                     ep=self.cfg.endpoint)
        if authorized.authorized():
            return
        admins = [u.name for u in self.core.users.users() if u.role in CONSOLE_ROLES]
        if self.cfg.password_login and admins:
            return
        ep = self.cfg.ep
        port = ep.port or "PORT"
        host = "127.0.0.1" if ep.host in ("0.0.0.0", "::") else ep.host
        users = ("\nor add an admin user: iotserver users add NAME --role admin"
                 if self.cfg.password_login else "")
        log.warn("console: nobody can log in yet. Add a public key with\n"
                 "    mkdir -p {dir} && cat ~/.ssh/id_ed25519.pub >> {path} && chmod 600 {path}"
                 "{users}\nthen: ssh -p {port} admin@{host}", dir=str(authorized.path.parent),
                 path=str(authorized.path), port=port, host=host, users=users)

    async def stop(self) -> None:
        self.port = None
        if self.listeners is not None:
            await self.listeners.stop()
        if self.context is not None:
            for session in list(self.context.sessions):
                session.disconnect()
        if self.factory is not None and self.factory.connections:
            await self.factory.disconnect_all(self.context.clock if self.context else None)
        if self.listeners is not None:
            await self.listeners.drain()


def make_service(core: Any, cfg: ConsoleConfig) -> ConsoleService:
    return ConsoleService(core, cfg)
