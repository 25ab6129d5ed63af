"""OPC UA client source: subscribe to another server's nodes and feed them into the tag store.

Per ``[[opcua.clients]]``: connect (our application certificate for signed/encrypted channels,
username/password or an X509 user token), subscribe to the mapped nodes (and to every variable
below a browsed folder), apply the values with their status codes and source timestamps, and
carry writes back (the source is the tags' owner ``opcua:<name>``).

Robustness (gateway users' most reported pain: connections that never come back after a PLC
restart): the connection is supervised; on loss the
tags go Bad_NotConnected (keeping their last value), and reconnection runs with exponential
backoff plus jitter, re-creating the session and subscription from scratch, so a restarted PLC
or server comes back without operator action. ``reconnect()`` (the Reconnect method in the
address space) forces an immediate new attempt.

The remote server's certificate is checked against our trust list (``pki/trusted``); an unknown
one is refused and copied to ``pki/rejected`` like a client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from typing import Any

import numpy as np
from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.ua.uaerrors import UaStatusCodeError
from twisted.internet.defer import Deferred

from iotserver.opcua.config import POLICIES, ClientConfig
from iotserver.opcua.convert import datetime_to_ns, quality_of, to_variant
from iotserver.tags.model import Access, DataType, Quality, TagDef, Update

log = logging.getLogger("iotserver.opcua.client")

_TYPES = {vt.value: dt for dt, vt in {
    DataType.BOOLEAN: ua.VariantType.Boolean, DataType.INT16: ua.VariantType.Int16,
    DataType.INT32: ua.VariantType.Int32, DataType.INT64: ua.VariantType.Int64,
    DataType.UINT16: ua.VariantType.UInt16, DataType.UINT32: ua.VariantType.UInt32,
    DataType.UINT64: ua.VariantType.UInt64, DataType.FLOAT32: ua.VariantType.Float,
    DataType.FLOAT64: ua.VariantType.Double, DataType.STRING: ua.VariantType.String,
}.items()}
_BAD_SEGMENT = re.compile(r"[^A-Za-z0-9_\-. ]")


class _Handler:
    """asyncua subscription handler: collects changes, applies them once per loop turn."""

    def __init__(self, source: ClientSource) -> None:
        self.source = source

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.source._queue(node.nodeid, data.monitored_item.Value)

    def status_change_notification(self, status: Any) -> None:
        self.source._lost.set()


class ClientSource:
    """One southbound OPC UA connection (see the module docstring)."""

    def __init__(self, core: Any, cfg: ClientConfig, service: Any) -> None:
        self.core = core
        self.cfg = cfg
        self.service = service
        self.owner = cfg.owner
        self.client: Client | None = None
        self.connected = False
        self.connects = 0
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._by_node: dict[ua.NodeId, TagDef] = {}  # resolved at each connect
        self._nodes: dict[str, Any] = {}  # tag path -> asyncua Node
        self._pending: list[Update] = []
        self._flush_handle: asyncio.Handle | None = None
        self._browsed: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.core.store.register_owner(self.owner, self)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._disconnect()
        self.core.store.unregister_owner(self.owner)
        self._mark(Quality.BAD_OUT_OF_SERVICE)

    def reconnect(self) -> None:
        """Drop the current connection (if any) and try again now, without backoff."""
        self._wake.set()
        self._lost.set()

    def _tag_paths(self) -> list[str]:
        return [m.tag.path for m in self.cfg.nodes] + sorted(self._browsed)

    def _mark(self, quality: Quality) -> None:
        store = self.core.store
        updates = [Update(p, store.read(p).value, quality, self._source_ns(store.tag(p), 0))
                   for p in self._tag_paths() if p in store]
        if updates:
            store.apply(updates)

    async def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        while True:
            self._lost.clear()
            try:
                await self._session()
                delay = self.cfg.reconnect_min_s  # the last session worked: start over
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("OPC UA client %s: %s: %s", self.cfg.name, type(exc).__name__,
                            exc)
            self.connected = False
            await self._disconnect()
            self._mark(Quality.BAD_NOT_CONNECTED)
            if self._wake.is_set():
                self._wake.clear()
                continue
            wait = delay * random.uniform(0.5, 1.5)  # jitter: PLCs restarted together
            log.info("OPC UA client %s: reconnecting in %.1f s", self.cfg.name, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _session(self) -> None:
        cfg = self.cfg
        client = Client(cfg.endpoint, timeout=cfg.timeout_s)
        self.client = client
        client.application_uri = self.service.cfg.application_uri
        client.name = client.description = f"iotserver client {cfg.name}"
        client.connection_lost_callback = self._on_lost
        if self.service.trust is not None:
            from iotserver.opcua.security import ClientCertificateValidator

            # the same trust list and checks, applied to the server's certificate
            client.certificate_validator = ClientCertificateValidator(self.service.trust)
        pki = self.service.cfg.pki_path(self.core.config.server.data_dir)
        if cfg.security_policy != "None":
            policy = getattr(security_policies,
                             f"SecurityPolicy{POLICIES[cfg.security_policy]}")
            await client.set_security(
                policy, str(pki / "own" / "certs" / "iotserver.der"),
                str(pki / "own" / "private" / "iotserver.pem"),
                mode=getattr(ua.MessageSecurityMode, cfg.security_mode))
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password or "")
        if cfg.user_certificate is not None:
            await client.load_client_certificate(str(cfg.user_certificate))
            await client.load_private_key(str(cfg.user_private_key))
        await client.connect()
        self.connects += 1
        log.info("OPC UA client %s: connected to %s", cfg.name, cfg.endpoint)
        await self._resolve(client)
        if cfg.browse:
            await self._browse(client)
        handler = _Handler(self)
        sub = await client.create_subscription(cfg.publishing_interval_ms, handler)
        nodes = list(self._nodes.values())
        for i in range(0, len(nodes), 500):
            results = await sub.subscribe_data_change(
                nodes[i:i + 500], queuesize=1, sampling_interval=cfg.sampling_interval_ms)
            for node, res in zip(nodes[i:i + 500], results, strict=True):
                if isinstance(res, ua.StatusCode):
                    tag = self._by_node[node.nodeid]
                    log.warning("OPC UA client %s: cannot subscribe %s (%s): %s", cfg.name,
                                node.nodeid.to_string(), tag.path, res.name)
                    self.core.store.apply([Update(tag.path, None, quality_of(res.value))])
        self.connected = True
        await self._lost.wait()
        log.warning("OPC UA client %s: connection to %s lost", cfg.name, cfg.endpoint)

    async def _on_lost(self, exc: Exception) -> None:
        self._lost.set()

    async def _disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), self.cfg.timeout_s)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
            self._flush()

    # -- node resolution -----------------------------------------------------------------
    async def _resolve(self, client: Client) -> None:
        """NodeIds of the configured nodes (``nsu=`` resolved against the namespace array)."""
        uris = await client.get_namespace_array()
        self._by_node.clear()
        self._nodes.clear()
        for mapping in self.cfg.nodes:
            try:
                node_id = _parse_node_id(mapping.node_id, uris)
            except ValueError as exc:
                log.warning("OPC UA client %s: %s", self.cfg.name, exc)
                self.core.store.apply([Update(mapping.tag.path, None,
                                              Quality.BAD_CONFIGURATION_ERROR)])
                continue
            self._by_node[node_id] = mapping.tag
            self._nodes[mapping.tag.path] = client.get_node(node_id)

    async def _browse(self, client: Client) -> None:
        """Variables below each browsed folder become tags ``<prefix>/<browse path>``."""
        uris = await client.get_namespace_array()
        store = self.core.store
        for mapping in self.cfg.browse:
            root = client.get_node(_parse_node_id(mapping.node_id, uris))
            found: list[tuple[str, Any]] = []
            await _walk(root, mapping.prefix, mapping.max_depth, found)
            for path, node in found:
                dtype_id = await node.read_data_type()
                dtype = _TYPES.get(dtype_id.Identifier) if dtype_id.NamespaceIndex == 0 else None
                if dtype is None or path in self._nodes:
                    continue
                rank = await node.read_value_rank()
                if rank not in (-1, -3):  # scalars only for browsed nodes
                    continue
                level = await node.get_access_level()
                writable = mapping.writable and ua.AccessLevel.CurrentWrite in level
                tag = TagDef(path, dtype, access=Access.READ_WRITE if writable else Access.READ,
                             owner=self.owner,
                             description=f"{self.cfg.name}: {node.nodeid.to_string()}")
                if path in store:
                    if store.tag(path).owner != self.owner:
                        log.warning("OPC UA client %s: tag %s exists with another owner; "
                                    "skipped", self.cfg.name, path)
                        continue
                else:
                    store.define(tag)
                self._browsed.add(path)
                self._by_node[node.nodeid] = store.tag(path)
                self._nodes[path] = node

    # -- values --------------------------------------------------------------------------
    def _queue(self, node_id: ua.NodeId, dv: ua.DataValue) -> None:
        tag = self._by_node.get(node_id)
        if tag is None:
            return
        code = dv.StatusCode.value if dv.StatusCode is not None else 0
        quality = quality_of(code)
        value = dv.Value.Value if dv.Value is not None else None
        if quality.is_bad or value is None:
            value = self.core.store.read(tag.path).value  # keep the last value
            quality = quality if quality.is_bad else Quality.BAD
        else:
            value = _to_store(tag, value)
            if value is None:
                value, quality = self.core.store.read(tag.path).value, Quality.BAD_TYPE_MISMATCH
        self._pending.append(Update(tag.path, value, quality,
                                    self._source_ns(tag, datetime_to_ns(dv.SourceTimestamp))))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _source_ns(self, tag: TagDef, ns: int) -> int:
        """The remote source timestamp, moved forward if it would go back in a history ring.

        Ring buffers only take samples in time order and ``TagStore.apply`` raises on an older
        one (a remote clock stepped back); clamping keeps the value flowing.
        """
        if not tag.historize:
            return ns
        ns = ns or self.core.store.now_ns()
        key = f"tag:{tag.path}"
        rings = self.core.rings
        latest = rings.get(key).latest() if key in rings else None
        if latest is not None and ns < latest[0]:
            log.debug("OPC UA client %s: %s timestamp went back; clamped", self.cfg.name,
                      tag.path)
            return int(latest[0])
        return ns

    def _flush(self) -> None:
        self._flush_handle = None
        batch, self._pending = self._pending, []
        if batch:
            self.core.store.apply(batch)

    # -- writes (TagOwner) ---------------------------------------------------------------
    def write_tag(self, tag: TagDef, value: Any) -> Deferred[Quality] | Quality:
        node = self._nodes.get(tag.path)
        if not self.connected or node is None:
            return Quality.BAD_NOT_CONNECTED
        return Deferred.fromFuture(asyncio.ensure_future(self._write(node, tag, value)))

    async def _write(self, node: Any, tag: TagDef, value: Any) -> Quality:
        # no timestamps: many servers refuse them with Bad_WriteNotSupported (Part 4 5.11.4)
        dv = ua.DataValue(to_variant(tag, value))
        try:
            await node.write_attribute(ua.AttributeIds.Value, dv)
        except UaStatusCodeError as exc:
            return quality_of(exc.code)
        except (ConnectionError, TimeoutError):
            return Quality.BAD_NOT_CONNECTED
        return Quality.GOOD


def _parse_node_id(text: str, uris: list[str]) -> ua.NodeId:
    if text.startswith("nsu="):
        uri, _, rest = text[4:].partition(";")
        if uri not in uris:
            raise ValueError(f"namespace {uri!r} of {text!r} is not on the server")
        node_id = ua.NodeId.from_string(rest)
        return ua.NodeId(node_id.Identifier, uris.index(uri), node_id.NodeIdType)
    return ua.NodeId.from_string(text)


async def _walk(node: Any, prefix: str, depth: int, out: list[tuple[str, Any]]) -> None:
    if depth <= 0:
        return
    for child in await node.get_children(refs=ua.ObjectIds.HierarchicalReferences):
        node_class = await child.read_node_class()
        name = _BAD_SEGMENT.sub("_", (await child.read_browse_name()).Name).strip() or "_"
        path = f"{prefix}/{name}"
        if node_class == ua.NodeClass.Variable:
            out.append((path, child))
        elif node_class == ua.NodeClass.Object:
            await _walk(child, path, depth - 1, out)


def _to_store(tag: TagDef, value: Any) -> Any:
    """A received value in the tag's representation, or None when it does not fit."""
    try:
        if tag.shape:
            arr = np.asarray(value, dtype=tag.data_type.numpy_dtype).reshape(tag.shape)
            arr.setflags(write=False)
            return arr
        dt = tag.data_type
        if dt is DataType.STRING:
            return value if isinstance(value, str) else None
        if dt is DataType.BOOLEAN:
            return bool(value)
        if dt.is_integer:
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        return None
