"""The one place where iotserver uses asyncua names that are not its public API.

Everything the OPC UA package needs from asyncua beyond the public ``ua`` types, the binary
codec (``asyncua.ua.ua_binary``), the security policies and the standard address space goes
through this module. At import it checks that every attribute it relies on exists (methods on the
classes, instance attributes in the names their ``__init__`` assigns) and records what is
missing; the OPC UA service calls :func:`check` first thing at startup, which stops it with one
line naming the installed asyncua version (``AsyncuaIncompatible`` -> StartupError).

What is used, and why:

* ``Server._policies`` (the security policy factories ``set_security_policy`` builds) and
  ``Server._setup_server_nodes`` (where the endpoints are made): our listener needs the
  factories, and the server certificate chain goes into the endpoints there (Part 6 6.7.2).
* ``Server._application_uri``: asyncua has no setter for the ApplicationUri.
* ``AddressSpace._nodes`` and ``_handle_to_attribute_map``: the virtual tag nodes
  (``nodecache.py``) live in that dict; :func:`retype` turns the AddressSpace asyncua's services
  already share into our subclass (only methods differ, no new instance state).
* ``MonitoredItemService._monitored_item_counter`` / ``_monitored_items`` and the per-item
  helpers ``_create_events_monitored_item`` / ``_modify_monitored_item`` /
  ``_delete_monitored_items``: our data-change items share the id counter with asyncua's event
  items (``monitoring.py``).
* ``InternalServer.time_task``: the ServerStatus clock, cancelled at stop.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from asyncua import Server
from asyncua.common.connection import SecureConnection, TransportLimits
from asyncua.server.address_space import AddressSpace
from asyncua.server.internal_server import InternalServer
from asyncua.server.monitored_item_service import MonitoredItemService

try:
    ASYNCUA_VERSION = version("asyncua")
except PackageNotFoundError:  # pragma: no cover - run from a source tree
    ASYNCUA_VERSION = "unknown"


class AsyncuaIncompatible(RuntimeError):
    """The installed asyncua lacks something this package relies on."""


PROBLEMS: list[str] = []


def _require(owner: Any, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(owner, n)]
    if missing:
        PROBLEMS.append(f"{owner.__name__} has no {', '.join(missing)}")


_require(Server, ("_setup_server_nodes", "init", "load_certificate", "load_private_key",
                  "set_security_policy", "set_identity_tokens", "register_namespace"))
_require(SecureConnection, ("select_policy", "open", "close", "is_open", "set_policy_factories",
                            "receive_from_header_and_body", "message_to_binary"))
_require(MonitoredItemService, ("_create_events_monitored_item", "_modify_monitored_item",
                                "_delete_monitored_items", "delete_monitored_items",
                                "modify_monitored_items", "trigger_event"))
_require(InternalServer, ("get_endpoints", "get_new_channel_id", "decrypt_user_token",
                          "verify_x509_token", "start", "stop"))
_require(AddressSpace, ("add_datachange_callback", "delete_datachange_callback",
                        "read_attribute_value"))


def _assigned(func: Any, names: tuple[str, ...]) -> None:
    """Instance attributes that ``func`` (an ``__init__``) sets, checked without an instance."""
    code = func.__code__
    missing = [n for n in names if n not in code.co_names]
    if missing:
        PROBLEMS.append(f"{func.__qualname__} sets no {', '.join(missing)}")


_assigned(Server.__init__, ("_policies", "_application_uri", "iserver"))
_assigned(InternalServer.__init__, ("time_task", "aspace", "certificate_validator",
                                    "user_manager"))
_assigned(AddressSpace.__init__, ("_nodes", "_handle_to_attribute_map"))
_assigned(MonitoredItemService.__init__, ("_monitored_item_counter", "_monitored_items"))

__all__ = ["ASYNCUA_VERSION", "AsyncuaIncompatible", "SecureConnection", "TransportLimits",
           "check", "check_server", "node_table", "policy_factories", "retype",
           "set_application_uri", "set_node_table", "setup_endpoints", "take_time_task"]


def check() -> None:
    """Raise :class:`AsyncuaIncompatible` (one line) if the import-time checks failed."""
    if PROBLEMS:
        raise AsyncuaIncompatible(f"asyncua {ASYNCUA_VERSION} is not supported: "
                                  f"{'; '.join(PROBLEMS)} (iotserver needs asyncua 2.1)")


def check_server(server: Server) -> None:
    """Check the instance attributes used from a constructed ``Server`` (at startup)."""
    for obj, names in ((server, ("_policies", "_application_uri", "iserver")),
                       (server.iserver, ("time_task", "aspace", "supported_tokens",
                                         "certificate_validator", "user_manager")),
                       (server.iserver.aspace, ("_nodes",))):
        missing = [n for n in names if not hasattr(obj, n)]
        if missing:
            raise AsyncuaIncompatible(
                f"asyncua {ASYNCUA_VERSION} is not supported: {type(obj).__name__} has no "
                f"{', '.join(missing)} (iotserver needs asyncua 2.1)")


def policy_factories(server: Server) -> list[Any]:
    """The security policy factories of ``server`` (after ``set_security_policy``)."""
    return list(server._policies)


async def setup_endpoints(server: Server) -> None:
    """Build the endpoint descriptions and policy factories (what ``Server.start`` does first)."""
    await server._setup_server_nodes()


def set_application_uri(server: Server, uri: str) -> None:
    server._application_uri = uri


def node_table(aspace: AddressSpace) -> Any:
    return aspace._nodes


def set_node_table(aspace: AddressSpace, table: Any) -> None:
    aspace._nodes = table


def retype(aspace: AddressSpace, cls: type) -> None:
    """Make ``aspace`` an instance of ``cls``, a method-only subclass of AddressSpace."""
    assert issubclass(cls, AddressSpace) and "__init__" not in cls.__dict__
    aspace.__class__ = cls


def take_time_task(iserver: InternalServer) -> Any:
    """Detach the ServerStatus clock task (so that ``stop`` does not wait for its sleep)."""
    task, iserver.time_task = iserver.time_task, None
    return task
