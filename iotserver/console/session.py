"""SSH session glue: an interactive manhole for shells, a one-shot evaluator for exec requests.

``ssh host`` opens a colored Python prompt (twisted.conch.manhole) with the console namespace;
``ssh host 'expression'`` evaluates the statements, waits for a Deferred or coroutine result, and
ends the channel with exit status 0, or 1 with the exception line on stderr. Twisted's own
``TerminalSession`` refuses exec requests and raises on window changes and EOF; this replaces it.

The conch manhole modules import the reactor on import, so they are imported lazily here.
"""

from __future__ import annotations

import ast
import io
import traceback
from contextlib import redirect_stdout
from functools import cache
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh.session import SSHSession
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from iotserver.console.namespace import (
    ConsoleExit,
    RecordedWrite,
    Tags,
    WriteResult,
    as_deferred,
    cancel_if_owned,
    display,
    make_namespace,
    with_timeout,
)
from iotserver.tags.writer import Writer

log = Logger(namespace="iotserver.console")

# How long an exec request waits for a Deferred or coroutine result.
EXEC_TIMEOUT = 60.0

BANNER = (
    "iotserver console: Python inside the running server. help() lists the helpers; "
    "Ctrl-D leaves.\r\n"
)


class ConsoleContext:
    """What every session of one console service shares."""

    def __init__(self, core: Any, clock: Any) -> None:
        self.core = core
        self.clock = clock
        self.sessions: set[ConsoleSession] = set()


class ConsoleAvatar(ConchUser):
    """A logged-in console user; each session channel gets its own ConsoleSession."""

    def __init__(self, username: str, context: ConsoleContext, peer: str = "") -> None:
        super().__init__()
        self.username = username
        self.context = context
        self.writer = Writer(username, "console", peer)  # tags.write in the audit trail
        self.channelLookup[b"session"] = SSHSession


@implementer(IRealm)
class ConsoleRealm:
    def __init__(self, context: ConsoleContext) -> None:
        self.context = context

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("the console only serves SSH users")
        name = avatar_id.decode("utf-8", "replace")  # the login module logged the login
        avatar = ConsoleAvatar(name, self.context, mind if isinstance(mind, str) else "")
        return IConchUser, avatar, lambda: log.info("console: {user} logged out", user=name)


def evaluate(source: str, namespace: dict[str, Any], filename: str = "<ssh>") -> Any:
    """Run ``source`` (statements allowed); the value of a final expression is returned."""
    tree = ast.parse(source, filename, "exec")
    last: ast.Expression | None = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr):
        tree.body.pop()
        last = ast.Expression(final.value)
    exec(compile(tree, filename, "exec"), namespace)
    if last is None:
        return None
    return eval(compile(last, filename, "eval"), namespace)


def error_line(exc: BaseException) -> str:
    """The exception as the last line of a traceback, without the frames (or module path)."""
    if isinstance(exc, SyntaxError):  # keeps the offending line and the caret
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Input:
    """Transport of the channel's process protocol: bytes from the client go to ``sink``."""

    def __init__(self, sink: Any, on_lost: Any) -> None:
        self._sink = sink
        self._on_lost = on_lost

    def write(self, data: bytes) -> None:
        self._sink(data)

    def loseConnection(self) -> None:
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()


class _Output:
    """Transport of the terminal protocol: bytes to the client; loseConnection ends the shell."""

    def __init__(self, session: ConsoleSession) -> None:
        self._session = session

    def write(self, data: bytes) -> None:
        self._session.send(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self._session.send(b"".join(seq))

    def loseConnection(self) -> None:
        self._session.finish(0)

    def getPeer(self) -> Any:
        return self._session.peer()

    def getHost(self) -> Any:
        return self._session.host()


@implementer(ISession)
class ConsoleSession:
    """One session channel: a shell (manhole) or one exec request."""

    def __init__(self, avatar: ConsoleAvatar) -> None:
        self.avatar = avatar
        self.context = avatar.context
        self.size = (24, 80)  # rows, columns
        self.pty = False
        self._pp: Any = None
        self._terminal: Any = None  # insults.ServerProtocol of a shell
        self._finished = False
        self._closed = False
        self._call: Any = None  # IDelayedCall of a scheduled exec
        self._pending: Deferred[Any] | None = None  # an exec result being waited for
        self._script: bytearray | None = None  # a script arriving on stdin (no pty shell)
        self._writes: list[RecordedWrite] = []  # tags.write calls of the running script
        self.context.sessions.add(self)

    # -- ISession ---------------------------------------------------------------------------
    def getPty(self, term: bytes, window_size: tuple[int, ...], modes: Any) -> None:
        self.pty = True
        self.size = (window_size[0] or 24, window_size[1] or 80)

    def openShell(self, pp: Any) -> None:
        if not self.pty:
            self._open_script(pp)
            return
        from twisted.conch.insults import insults

        self._pp = pp
        namespace = make_namespace(self.context.core, writer=self.avatar.writer)
        self._terminal = insults.ServerProtocol(console_manhole_class(), namespace)
        self._terminal.makeConnection(_Output(self))
        pp.makeConnection(_Input(self._terminal.dataReceived, self._terminal_lost))
        rows, cols = self.size
        self._terminal.terminalProtocol.terminalSize(cols, rows)

    def _open_script(self, pp: Any) -> None:
        """A shell without a terminal (``ssh host < script.py``): stdin is the script, run at
        EOF like an exec request."""
        self._pp = pp
        self._script = bytearray()
        pp.makeConnection(_Input(self._script_data, lambda: None))

    def _script_data(self, data: bytes) -> None:
        if self._script is None or self._finished:
            return
        self._script += data
        limit = self._max_script_bytes()
        if len(self._script) > limit:
            self._script = None
            self.send(self._text(f"script longer than console.max_script_bytes ({limit})"),
                      stderr=True)
            self.finish(1)

    def _max_script_bytes(self) -> int:
        cfg = self.context.core.config.sections.get("console")
        return int(getattr(cfg, "max_script_bytes", 1 << 20))

    def execCommand(self, pp: Any, command: bytes) -> None:
        self._pp = pp
        pp.makeConnection(_Input(lambda data: None, lambda: None))  # stdin is not used
        # Run on the next turn: the channel request must be answered before the channel closes.
        self._call = self.context.clock.callLater(
            0, self._run_exec, command.decode("utf-8", "replace")
        )

    def windowChanged(self, window_size: tuple[int, ...]) -> None:
        self.size = (window_size[0] or self.size[0], window_size[1] or self.size[1])
        proto = getattr(self._terminal, "terminalProtocol", None)
        if proto is not None:
            proto.terminalSize(self.size[1], self.size[0])

    def eofReceived(self) -> None:
        # The client's stdin ended. An exec request still answers; a shell is over; a script
        # read from stdin is complete and runs now.
        if self._terminal is not None:
            self.finish(0)
        elif self._script is not None and not self._finished:
            source, self._script = bytes(self._script), None
            self._call = self.context.clock.callLater(
                0, self._run_exec, source.decode("utf-8", "replace"), "<stdin>")

    def closed(self) -> None:
        self._closed = True
        self._finished = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        pending, self._pending = self._pending, None
        if pending is not None:
            cancel_if_owned(pending)
        self._terminal_lost()
        self.context.sessions.discard(self)

    # -- output -----------------------------------------------------------------------------
    def send(self, data: bytes, *, stderr: bool = False) -> None:
        if self._finished or self._pp is None or not data:
            return
        if stderr:
            self._pp.errReceived(data)
        else:
            self._pp.outReceived(data)

    def finish(self, status: int) -> None:
        """Send the exit status and close the channel (once)."""
        if self._finished or self._pp is None:
            return
        self._finished = True
        reason = ProcessDone(None) if status == 0 else ProcessTerminated(exitCode=status)
        self._pp.processEnded(Failure(reason))

    def disconnect(self) -> None:
        """Close the channel from the server side (service stop)."""
        if self._terminal is not None and not self._finished:
            self.send(b"\r\nserver shutting down\r\n")
        self.finish(0)

    def peer(self) -> Any:
        return self._pp.getPeer() if self._pp is not None else None

    def host(self) -> Any:
        return self._pp.getHost() if self._pp is not None else None

    def _terminal_lost(self) -> None:
        terminal, self._terminal = self._terminal, None
        if terminal is not None:
            from twisted.internet.error import ConnectionDone

            terminal.connectionLost(Failure(ConnectionDone("console session ended")))

    # -- exec -------------------------------------------------------------------------------
    def _text(self, text: str) -> bytes:
        if text and not text.endswith("\n"):
            text += "\n"
        if self.pty:  # the client's terminal is raw: it needs CR LF
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        return text.encode("utf-8", "replace")

    def _run_exec(self, source: str, filename: str = "<ssh>") -> None:
        self._call = None
        if self._closed:
            return
        out = io.StringIO()
        namespace = make_namespace(self.context.core, writer=self.avatar.writer)
        tags = namespace.get("tags")
        if isinstance(tags, Tags):
            tags.record = self._writes
        try:
            with redirect_stdout(out):
                value = evaluate(source, namespace, filename)
        except (ConsoleExit, SystemExit) as exc:  # SystemExit must never reach the event loop
            self.send(self._text(out.getvalue()))
            code = exc.code
            if code is not None and not isinstance(code, int):
                self.send(self._text(str(code)), stderr=True)
            self.finish(code if isinstance(code, int) else (0 if code is None else 1))
            return
        except BaseException as exc:
            self._fail(out.getvalue(), exc)
            return
        self.send(self._text(out.getvalue()))
        d = as_deferred(value)
        if d is None:
            self._done(value)
            return
        self._pending = with_timeout(d, EXEC_TIMEOUT, self.context.clock)
        self._pending.addCallbacks(self._done, lambda f: self._fail("", f.value))

    def _done(self, value: Any) -> None:
        self._pending = None
        if value is not None:
            self.send(self._text(display(value)))
        failed = isinstance(value, WriteResult) and not value.ok
        self._after_writes(1 if failed else 0, value)

    def _fail(self, output: str, exc: BaseException) -> None:
        self._pending = None
        self.send(self._text(output))
        self.send(self._text(error_line(exc)), stderr=True)
        self._after_writes(1, None)

    def _after_writes(self, status: int, value: Any) -> None:
        """Wait for every write the script made; any that failed makes the exit status 1 and
        is named on stderr (the script's last value was printed already)."""
        from twisted.internet.defer import DeferredList

        if self._closed:
            return
        writes = self._writes
        waiting = [w.done for w in writes if w.outcome is None]

        def report(_: object) -> None:
            self._pending = None
            failed = [w for w in writes if w.failed]
            for w in failed:
                if w.result is not value and w.outcome is not value:
                    self.send(self._text(f"write failed: {w.describe()}"), stderr=True)
            self.finish(1 if failed or status else 0)

        if not waiting:
            report(None)
            return
        self._pending = with_timeout(DeferredList(waiting), EXEC_TIMEOUT, self.context.clock)
        self._pending.addBoth(report)


components.registerAdapter(ConsoleSession, ConsoleAvatar, ISession)


@cache
def console_manhole_class() -> type:
    """The interactive prompt: twisted's ColoredManhole with our display and exit handling."""
    from twisted.conch.insults import insults
    from twisted.conch.manhole import ColoredManhole, ManholeInterpreter

    class ConsoleInterpreter(ManholeInterpreter):
        def push(self, line: bytes) -> bool:
            # manhole decodes strictly; a stray byte must not cost the session
            return bool(super().push(line.decode("utf-8", "replace").encode("utf-8")))

        def runcode(self, code: Any) -> None:
            with self.monkeyPatcher:
                try:
                    exec(code, self.locals)
                except ConsoleExit:
                    self.handler.handle_QUIT()
                except SystemExit:
                    self.handler.handle_QUIT()
                except BaseException:
                    self.showtraceback()

        def excepthook(self, exc_type: Any, exc: BaseException, tb: Any) -> None:
            first = tb
            while first is not None and first.tb_frame.f_code.co_filename != self.filename:
                first = first.tb_next
            self.write("".join(traceback.format_exception(exc_type, exc, first or tb)))

        def displayhook(self, obj: Any) -> None:
            if obj is None:
                return
            d = as_deferred(obj)
            if d is None:
                self.locals["_"] = obj
                self.write(display(obj))
                return
            later = [False]
            self.handler.pending.add(d)
            d.addBoth(lambda r: (self.handler.pending.discard(d), r)[1])

            def shown(result: Any) -> None:
                self.locals["_"] = result
                if result is not None:
                    self.write(display(result), later[0])

            def failed(failure: Failure) -> None:
                self.write(error_line(failure.value or Exception("?")), later[0])

            d.addCallbacks(shown, failed)
            later[0] = True

    class ConsoleManhole(ColoredManhole):
        gone = False

        def connectionMade(self) -> None:
            self.pending: set[Deferred[Any]] = set()  # results still to print
            super().connectionMade()
            self.interpreter = ConsoleInterpreter(self, self.namespace)

        def initializeScreen(self) -> None:
            # No terminal reset: the user's scrollback stays.
            self.terminal.write(BANNER.encode())
            self.terminal.write(self.ps[self.pn])
            self.setInsertMode()

        def terminalSize(self, width: int, height: int) -> None:
            # Remember the size; RecvLine would erase the whole screen on every resize.
            self.width, self.height = width, height

        def handle_QUIT(self) -> None:
            if self.gone:
                return
            self.gone = True
            self.terminal.resetModes([insults.modes.IRM])
            self.terminal.write(b"\r\n")
            self.terminal.transport.loseConnection()

        def addOutput(self, data: Any, isAsync: Any = None) -> None:
            if not self.gone:  # a Deferred may fire after the user left
                super().addOutput(data, isAsync)

        def connectionLost(self, reason: Any) -> None:
            self.gone = True
            for d in list(self.pending):  # nobody is left to see them
                cancel_if_owned(d)

    return ConsoleManhole
