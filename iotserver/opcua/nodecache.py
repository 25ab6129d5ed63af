"""Virtual nodes for asyncua's address space: synthesized on lookup, cached, never stored.

asyncua keeps every node as a ``NodeData`` (an attribute dict of AttributeValue/DataValue
objects and a list of ReferenceDescriptions) in ``AddressSpace._nodes``: about 8 KB per tag
variable, 800 MB for 100,000 tags. Every service (Read, Browse, TranslateBrowsePaths, Write,
CreateMonitoredItems, Call, AddNodes...) reaches nodes only through that dictionary
(``get``, ``[]``, ``in``), so :class:`NodeTable` replaces it: the ordinary nodes (the standard
namespace, anything added through asyncua) are stored as before, and the nodes a
:class:`NodeProvider` describes are built on demand, kept in a small LRU cache and dropped.

State that must outlive a cached node:

* monitored attributes: an AttributeValue carrying datachange callbacks is *live*; it is kept
  (not the whole node) and put back into the node whenever the node is built again;
* nodes that asyncua code mutates (a method added below a folder appends a reference to the
  folder): the caller ``keep``s them first, which stores the whole NodeData for good.

:class:`TagAddressSpace` is asyncua's AddressSpace with the table installed and the callback
bookkeeping above; writes to virtual node attributes are refused (their WriteMask is 0 and
they could not persist).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

from iotserver.opcua import compat

DEFAULT_CAPACITY = 2048


class NodeProvider(Protocol):
    def has_node(self, node_id: ua.NodeId) -> bool: ...

    def make_node(self, node_id: ua.NodeId) -> NodeData | None: ...

    def attribute_live(self, node_id: ua.NodeId, attr: int, attval: AttributeValue | None
                       ) -> None:
        """An attribute got its first datachange callback (``attval``) or lost its last (None)."""


class NodeTable(dict):  # type: ignore[type-arg]
    """``AddressSpace._nodes``: stored nodes in the dict itself, virtual ones via ``__missing__``.

    ``table[id]`` costs nothing extra for stored nodes (dict lookup in C); ``get`` and ``in``
    are Python-level but only fall through to the provider on a miss.
    """

    def __init__(self, stored: dict[ua.NodeId, NodeData], capacity: int = DEFAULT_CAPACITY
                 ) -> None:
        super().__init__(stored)
        self.provider: NodeProvider | None = None
        self.capacity = capacity
        self.cache: OrderedDict[ua.NodeId, NodeData] = OrderedDict()
        self.kept: dict[ua.NodeId, NodeData] = {}
        self.live: dict[ua.NodeId, dict[int, AttributeValue]] = {}
        self.built = 0  # nodes synthesized (cache misses), for tests and statistics

    def __missing__(self, key: ua.NodeId) -> NodeData:
        node = self.kept.get(key)
        if node is not None:
            return node
        cache = self.cache
        node = cache.get(key)
        if node is not None:
            cache.move_to_end(key)
            return node
        provider = self.provider
        node = provider.make_node(key) if provider is not None else None
        if node is None:
            raise KeyError(key)
        self.built += 1
        live = self.live.get(key)
        if live:
            node.attributes.update(live)
        cache[key] = node
        if len(cache) > self.capacity:
            cache.popitem(last=False)
        return node

    def get(self, key: ua.NodeId, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        provider = self.provider
        return (provider is not None and isinstance(key, ua.NodeId)
                and (key in self.kept or key in self.cache or provider.has_node(key)))

    def __delitem__(self, key: ua.NodeId) -> None:
        if dict.__contains__(self, key):
            dict.__delitem__(self, key)
        else:
            self.forget(key)

    def is_virtual(self, key: ua.NodeId) -> bool:
        return not dict.__contains__(self, key) and key in self

    def built_node(self, key: ua.NodeId) -> NodeData | None:
        """The node object if one exists right now (kept or cached), without building it."""
        node = self.kept.get(key)
        return node if node is not None else self.cache.get(key)

    def keep(self, key: ua.NodeId) -> NodeData:
        """Build (if needed) and keep a virtual node for good: asyncua code will change it."""
        node: NodeData = self[key]
        self.cache.pop(key, None)
        self.kept[key] = node
        return node

    def forget(self, key: ua.NodeId) -> None:
        """Drop a virtual node's built state (it was removed or its content changed)."""
        self.cache.pop(key, None)
        self.kept.pop(key, None)


class TagAddressSpace(AddressSpace):  # type: ignore[misc]  # asyncua is untyped
    """asyncua's AddressSpace over a :class:`NodeTable`; see the module docstring."""

    _nodes: NodeTable

    @classmethod
    def install(cls, aspace: AddressSpace, provider: NodeProvider,
                capacity: int = DEFAULT_CAPACITY) -> TagAddressSpace:
        """Turn an existing AddressSpace (already shared by asyncua's services) into ours."""
        if not isinstance(compat.node_table(aspace), NodeTable):
            compat.set_node_table(aspace, NodeTable(compat.node_table(aspace), capacity))
        compat.retype(aspace, cls)  # only methods differ: no new instance state
        assert isinstance(aspace, TagAddressSpace)
        compat.node_table(aspace).provider = provider
        return aspace

    @property
    def table(self) -> NodeTable:
        return self._nodes

    def add_datachange_callback(self, nodeid: ua.NodeId, attr: Any,
                                callback: Any) -> tuple[ua.StatusCode, int]:
        sc, handle = super().add_datachange_callback(nodeid, attr, callback)
        table = self._nodes
        if sc.is_good() and table.is_virtual(nodeid):
            attrs = table.live.setdefault(nodeid, {})
            if attr not in attrs:
                attval = table[nodeid].attributes[attr]
                attrs[attr] = attval
                if table.provider is not None:
                    table.provider.attribute_live(nodeid, attr, attval)
        return sc, handle

    def delete_datachange_callback(self, handle: int) -> None:
        entry = self._handle_to_attribute_map.pop(handle, None)
        if entry is None:
            return
        nodeid, attr = entry
        table = self._nodes
        attrs = table.live.get(nodeid)
        attval = attrs.get(attr) if attrs else None
        if attval is None:
            node = table.get(nodeid)
            attval = node.attributes.get(attr) if node is not None else None
            if attval is not None:
                attval.datachange_callbacks.pop(handle, None)
            return
        attval.datachange_callbacks.pop(handle, None)
        if not attval.datachange_callbacks:
            del attrs[attr]  # type: ignore[union-attr]
            if not attrs:
                del table.live[nodeid]
            if table.provider is not None:
                table.provider.attribute_live(nodeid, attr, None)

    def live_handles(self, nodeid: ua.NodeId) -> list[tuple[int, Any]]:
        """(handle, callback) of every datachange callback on a virtual node."""
        out: list[tuple[int, Any]] = []
        for attval in self._nodes.live.get(nodeid, {}).values():
            out += attval.datachange_callbacks.items()
        return out

    async def write_attribute_value(self, nodeid: ua.NodeId, attr: Any,
                                    value: ua.DataValue) -> ua.StatusCode:
        if self._nodes.is_virtual(nodeid):
            # Part 4 5.11.4: WriteMask 0, and Values go through the tag store
            return ua.StatusCode(ua.StatusCodes.BadNotWritable)
        return await super().write_attribute_value(nodeid, attr, value)
