"""The ``iotserver`` command: run the server, check a configuration, and operator tools.

``iotserver run`` is the twistd line for people who do not know twistd; ``check-config`` parses a
file, opens every file it names (certificates, keys, user and ACL files, the data directory) and
prints what it would start, or one line per problem naming the key (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# Subcommands contributed by other packages: name -> ("module:function", help). The function
# receives the argparse subparser to fill in and returns the handler to run.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "certs": ("iotserver.security.certcli:setup", "create and inspect TLS / OPC UA certificates"),
    "users": ("iotserver.security.usercli:setup", "manage the user file (hashed passwords, roles)"),
    "sim-plc": ("iotserver.sim.plc:setup", "run a simulated Modbus TCP PLC for trying the poller"),
}


def _cmd_run(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run as twistd_run

    argv = ["twistd", "-n", "--reactor=asyncio"]
    if args.pidfile is not None:
        argv.append(f"--pidfile={args.pidfile}")
    if args.logfile:
        argv.append(f"--logfile={args.logfile}")
    argv.append("iotserver")
    if args.config:
        argv += ["--config", args.config]
    sys.argv = argv
    twistd_run()
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from iotserver import app, config
    from iotserver.confparse import ConfigError

    from iotserver.checkfiles import check_files

    try:
        cfg = config.load(args.file)
    except ConfigError as exc:
        print(f"iotserver: configuration error: {exc}", file=sys.stderr)
        return 1
    problems = check_files(cfg)
    for problem in problems:
        print(f"iotserver: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.file or '<default>'}: OK")
    for line in app.summary_lines(cfg):
        print(f"  {line}")
    return 0


def _cmd_show_default(args: argparse.Namespace) -> int:
    from iotserver.config import DEFAULT_CONFIG

    sys.stdout.write(DEFAULT_CONFIG)
    return 0


def build_parser() -> tuple[
    argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]
]:
    import importlib

    parser = argparse.ArgumentParser(
        prog="iotserver", description="Industrial IoT server: MQTT, Modbus TCP, OPC UA, tag store."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("run", help="run the server in the foreground (twistd -n --reactor=asyncio)")
    p.add_argument(
        "--config", "-c", help="TOML configuration file (default: built-in simulated plant)"
    )
    p.add_argument("--logfile", "-l", help="log file (default: stdout)")
    p.add_argument(
        "--pidfile", default="", help="pid file (default: none; twistd's own default is twistd.pid)"
    )
    handlers["run"] = _cmd_run

    p = sub.add_parser("check-config", help="validate a configuration file and show what it starts")
    p.add_argument("file", nargs="?", help="TOML file (omit to check the built-in default)")
    handlers["check-config"] = _cmd_check_config

    p = sub.add_parser("show-default-config", help="print the built-in default configuration")
    handlers["show-default-config"] = _cmd_show_default

    for name, (target, help_text) in EXTRA_COMMANDS.items():
        module, _, func = target.partition(":")
        try:
            setup = getattr(importlib.import_module(module), func)
        except ImportError:  # a package not installed in this build
            continue
        p = sub.add_parser(name, help=help_text)
        handlers[name] = setup(p)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`iotserver check-config | head`): not worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("iotserver: output closed early (broken pipe)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
