"""asyncua's internal server and session, with our services for the tag namespace.

:class:`IotSession` answers Read, Write and HistoryRead for tag and signal nodes itself and
hands every other node to asyncua:

* Read (Part 4 5.11.2): values come straight from the tag store (the current sample, honouring
  TimestampsToReturn); UserAccessLevel reflects the session's role.
* Write (Part 4 5.11.4): one StatusCode per item, never a fault for the whole request. A value
  goes through ``store.write`` to the tag's owner and the answer is the owner's Quality; the
  address space is *not* updated by the write: the store's change notification does that, so a
  write to a PLC tag shows what the PLC took.
* HistoryRead (Part 11): :mod:`iotserver.opcua.history` over the ring buffers.

:class:`IotInternalServer` creates :class:`IotSession` objects: the address space services of
our sessions (``sessions.py``), which own everything else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession

from iotserver.opcua.addrspace import CURRENT_WRITE, access_level
from iotserver.opcua.browse import ContinuationPoints, apply_result_masks
from iotserver.opcua.convert import WriteTypeError, from_variant, status, to_variant
from iotserver.opcua.methods import MethodCalls
from iotserver.opcua.monitoring import MAX_QUEUE_SIZE, Limits
from iotserver.opcua.security import can_write
from iotserver.tags.writer import Writer

if TYPE_CHECKING:
    from datetime import datetime

    from iotserver.opcua.addrspace import TagSpace
    from iotserver.opcua.history import HistoryReader, Series
    from iotserver.tags.store import TagStore

log = logging.getLogger("iotserver.opcua")
A = ua.AttributeIds


class Services:
    """What the sessions need from the service: the store, the tag space, history."""

    def __init__(self, store: TagStore, space: TagSpace, history: HistoryReader,
                 series: Callable[[ua.NodeId], Series | None]) -> None:
        self.store = store
        self.space = space
        self.history = history
        self.series = series
        self.writes = 0
        self.writes_refused = 0


class IotInternalServer(InternalServer):  # type: ignore[misc]  # asyncua is untyped
    """InternalServer with our subscription service and session class."""

    def __init__(self, user_manager: Any, *, max_items: int,
                 max_queue_size: int = MAX_QUEUE_SIZE) -> None:
        super().__init__(user_manager=user_manager)
        self.item_limits = Limits(max_items, max_queue_size)
        self.services: Services | None = None
        self.source_methods: dict[ua.NodeId, str] = {}
        self.method_calls: MethodCalls | None = None  # set by the service (methods.py)
        self.max_browse_continuation_points = 10  # per session (Part 4 5.8.2.1)

    def create_session(self, name: str, user: Any = None, external: bool = False
                       ) -> InternalSession:
        """The address space services of one of our sessions (``sessions.Session.services``);
        asyncua's session bookkeeping (tokens, activation, subscriptions) is not used."""
        from asyncua.crypto.permission_rules import User, UserRole

        return IotSession(self, self.aspace, None, name,
                          user=user or User(role=UserRole.Anonymous), external=False)


def _index_range(text: str) -> tuple[int, int] | None:
    """A one-dimensional NumericRange ``a`` or ``a:b`` (Part 4 7.27), else None."""
    try:
        if ":" in text:
            lo_s, hi_s = text.split(":", 1)
            lo, hi = int(lo_s), int(hi_s)
            return (lo, hi) if 0 <= lo < hi else None
        n = int(text)
        return (n, n) if n >= 0 else None
    except ValueError:
        return None


def _audit_refusal(store: TagStore, writer: Writer, path: str, wv: ua.WriteValue,
                   code: int) -> None:
    """A write refused before the store (role, attribute...): recorded in the audit trail."""
    from iotserver.tags.model import Quality

    try:
        quality = Quality(code)
    except ValueError:
        quality = Quality.BAD  # a code the tag model does not name
    value = getattr(getattr(wv.Value, "Value", None), "Value", None)
    store.audit_refusal(writer, path, value, quality)


class IotSession(InternalSession):  # type: ignore[misc]  # asyncua is untyped
    """A client session; see the module docstring."""

    iserver: IotInternalServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.browse_points = ContinuationPoints(self.iserver.max_browse_continuation_points)
        self.peer = ""  # the client's host:port, set by the session layer (audit trail)

    async def browse(self, params: ua.BrowseParameters) -> list[ua.BrowseResult]:
        """asyncua's Browse with the ResultMask applied, cut to RequestedMaxReferencesPerNode
        (Part 4 5.8.2)."""
        results: list[ua.BrowseResult] = await super().browse(params)
        for res in results:
            # asyncua says Bad_NodeIdInvalid for a well-formed NodeId that names no node;
            # Part 4 5.8.2.4: that is Bad_NodeIdUnknown
            if res.StatusCode.value == ua.StatusCodes.BadNodeIdInvalid:
                res.StatusCode = status(ua.StatusCodes.BadNodeIdUnknown)
        apply_result_masks(params, results)
        self.browse_points.page_results(results, params.RequestedMaxReferencesPerNode)
        return results

    async def browse_next(self, params: ua.BrowseNextParameters) -> list[ua.BrowseResult]:
        if not params.ContinuationPoints:
            raise ServiceError(ua.StatusCodes.BadNothingToDo)  # Part 4 5.8.3.3
        return self.browse_points.browse_next(params)

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        """Checked by :mod:`.methods` (arguments, object, role) before anything runs."""
        calls = self.iserver.method_calls
        if calls is None:
            everything: list[ua.CallMethodResult] = await super().call(params)
            return everything
        return await calls.call(params, self.user, self.session_id)

    # -- Read ----------------------------------------------------------------------------
    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        svc = self.iserver.services
        if svc is None:
            values: list[ua.DataValue] = await super().read(params)
            return values
        space = svc.space
        results: list[ua.DataValue | None] = [None] * len(params.NodesToRead)
        rest = []
        for i, rv in enumerate(params.NodesToRead):
            tag = space.tag_of(rv.NodeId)
            if tag is None or rv.AttributeId not in (A.Value, A.UserAccessLevel):
                if rv.AttributeId == A.Value and space.channel_of(rv.NodeId) is not None:
                    results[i] = self._read_channel(svc, rv.NodeId)
                else:
                    rest.append(i)
                continue
            if rv.AttributeId == A.UserAccessLevel:
                level = access_level(tag)
                if not can_write(self.user):
                    level &= ~CURRENT_WRITE
                results[i] = ua.DataValue(ua.Variant(level, ua.VariantType.Byte))
                continue
            results[i] = self._read_tag(svc, tag, rv, params.TimestampsToReturn)
        if rest:
            sub = ua.ReadParameters()
            sub.MaxAge = params.MaxAge
            sub.TimestampsToReturn = params.TimestampsToReturn
            sub.NodesToRead = [params.NodesToRead[i] for i in rest]
            for i, dv in zip(rest, await super().read(sub), strict=True):
                results[i] = dv
            if self.iserver.method_calls is not None:
                self.iserver.method_calls.fix_user_executable(params.NodesToRead, results,
                                                              self.user)
        return results

    @staticmethod
    def _read_channel(svc: Services, node_id: ua.NodeId) -> ua.DataValue:
        """A signal channel's Value: its newest sample."""
        series = svc.series(node_id)
        latest = series.ring.latest() if series is not None else None
        if latest is None:
            return ua.DataValue(StatusCode=status(ua.StatusCodes.BadWaitingForInitialData))
        ts, value = latest
        when = svc.space.times.source(ts)
        return ua.DataValue(ua.Variant(float(value), ua.VariantType.Float), status(0), when,
                            when)

    @staticmethod
    def _read_tag(svc: Services, tag: Any, rv: ua.ReadValueId,
                  timestamps: ua.TimestampsToReturn) -> ua.DataValue:
        if timestamps == ua.TimestampsToReturn.Invalid:
            return ua.DataValue(StatusCode=status(ua.StatusCodes.BadTimestampsToReturnInvalid))
        try:
            tv = svc.space.current(tag.path)
        except KeyError:
            return ua.DataValue(StatusCode=status(ua.StatusCodes.BadNodeIdUnknown))
        value = tv.value
        quality = int(tv.quality)
        if rv.IndexRange:
            rng = _index_range(rv.IndexRange)
            if rng is None or len(tag.shape) != 1:
                return ua.DataValue(StatusCode=status(ua.StatusCodes.BadIndexRangeInvalid))
            if value is None or rng[0] >= tag.shape[0]:
                return ua.DataValue(StatusCode=status(ua.StatusCodes.BadIndexRangeNoData))
            value = value[rng[0]:rng[1] + 1]
            tag = _SliceTag(tag)
        variant = (ua.Variant(None, ua.VariantType.Null) if quality & 0x80000000 or value is None
                   else to_variant(tag, value))
        space = svc.space
        src: datetime | None = space.times.source(tv.source_ns)
        srv: datetime | None = space.times.server(tv.server_ns)
        if timestamps == ua.TimestampsToReturn.Source:
            srv = None
        elif timestamps == ua.TimestampsToReturn.Server:
            src = None
        elif timestamps == ua.TimestampsToReturn.Neither:
            src = srv = None
        return ua.DataValue(variant, status(quality), src, srv)

    # -- Write ---------------------------------------------------------------------------
    async def write(self, params: ua.WriteParameters) -> list[ua.StatusCode]:
        svc = self.iserver.services
        if svc is None:
            codes: list[ua.StatusCode] = await super().write(params)
            return codes
        items = params.NodesToWrite
        results: list[ua.StatusCode | None] = [None] * len(items)
        pending: list[tuple[int, Any]] = []
        rest = []
        loop = asyncio.get_running_loop()
        user = self.user
        principal = f"opcua:{getattr(user, 'name', None) or 'anonymous'}"
        writer = Writer(getattr(user, "name", None) or "", "opcua", self.peer)
        for i, wv in enumerate(items):
            tag = svc.space.tag_of(wv.NodeId)
            if tag is None:
                node = self.aspace.get(wv.NodeId)
                if node is None:  # asyncua would answer BadUserAccessDenied
                    results[i] = status(ua.StatusCodes.BadNodeIdUnknown)
                elif wv.AttributeId not in node.attributes:
                    results[i] = status(ua.StatusCodes.BadAttributeIdInvalid)
                elif svc.space.channel_of(wv.NodeId) is not None:
                    results[i] = status(ua.StatusCodes.BadNotWritable)
                else:
                    rest.append(i)
                continue
            code = self._check_write(tag, wv)
            if code:
                results[i] = status(code)
                _audit_refusal(svc.store, writer, tag.path, wv, code)
                continue
            try:
                value = from_variant(tag, wv.Value.Value)
            except WriteTypeError as exc:
                log.info("OPC UA write to %s refused: %s", tag.path, exc)
                results[i] = status(ua.StatusCodes.BadTypeMismatch)
                continue
            d = svc.store.write(tag.path, value, writer=writer)
            pending.append((i, d.asFuture(loop)))
        if rest:
            sub = ua.WriteParameters()
            sub.NodesToWrite = [items[i] for i in rest]
            for i, sc in zip(rest, await super().write(sub), strict=True):
                results[i] = sc
        if pending:
            done = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
            for (i, _), quality in zip(pending, done, strict=True):
                code = (int(quality) if isinstance(quality, int)
                        else ua.StatusCodes.BadInternalError)
                results[i] = status(code)
                tag = svc.space.tag_of(items[i].NodeId)
                log.info("OPC UA write %s by %s: %s", tag.path if tag else items[i].NodeId,
                         principal, ua.StatusCode(code).name)
        svc.writes += len(items)
        svc.writes_refused += sum(1 for r in results if r is not None and r.is_bad())
        return results

    def _check_write(self, tag: Any, wv: ua.WriteValue) -> int:
        """Checks before the store sees the value (Part 4 5.11.4.4 operation results)."""
        if wv.AttributeId != A.Value:
            return cast(int, ua.StatusCodes.BadNotWritable)  # WriteMask is 0 for every attribute
        if not tag.writable:
            return cast(int, ua.StatusCodes.BadNotWritable)
        if not can_write(self.user):
            return cast(int, ua.StatusCodes.BadUserAccessDenied)
        if wv.IndexRange:
            return cast(int, ua.StatusCodes.BadWriteNotSupported)
        dv = wv.Value
        if dv is None:
            return cast(int, ua.StatusCodes.BadTypeMismatch)
        if dv.StatusCode is not None and dv.StatusCode.value != 0:
            # we do not take status from clients
            return cast(int, ua.StatusCodes.BadWriteNotSupported)
        # Source/server timestamps in the written DataValue are ignored rather than refused:
        # many clients (asyncua's among them) always send one, and the tag's timestamp is the
        # owner's (the PLC's) anyway.
        return 0

    # -- HistoryRead ---------------------------------------------------------------------
    async def history_read(self, params: ua.HistoryReadParameters) -> list[ua.HistoryReadResult]:
        svc = self.iserver.services
        if svc is None:
            history: list[ua.HistoryReadResult] = await super().history_read(params)
            return history
        details = params.HistoryReadDetails
        results: list[ua.HistoryReadResult | None] = [None] * len(params.NodesToRead)
        rest = []
        aggregates = getattr(details, "AggregateType", None) or []
        if isinstance(details, ua.ReadProcessedDetails) and \
                len(aggregates) != len(params.NodesToRead):
            raise ua.uaerrors.BadAggregateListMismatch  # Part 11 6.4.4.2
        for i, rv in enumerate(params.NodesToRead):
            series = svc.series(rv.NodeId)
            if series is None:
                if svc.space.tag_of(rv.NodeId) is not None:
                    # AccessLevel has no HistoryRead bit (Part 4 5.11.3.4)
                    res = ua.HistoryReadResult()
                    res.StatusCode = status(ua.StatusCodes.BadNotReadable)
                    results[i] = res
                else:
                    rest.append(i)
                continue
            aggregate = aggregates[i] if isinstance(details, ua.ReadProcessedDetails) else None
            results[i] = svc.history.read(details, series, rv, params.TimestampsToReturn,
                                          params.ReleaseContinuationPoints, aggregate)
        if rest:
            sub = ua.HistoryReadParameters()
            sub.HistoryReadDetails = details
            sub.TimestampsToReturn = params.TimestampsToReturn
            sub.ReleaseContinuationPoints = params.ReleaseContinuationPoints
            sub.NodesToRead = [params.NodesToRead[i] for i in rest]
            for i, res in zip(rest, await super().history_read(sub), strict=True):
                results[i] = res
        return results


class _SliceTag:
    """A tag view whose shape is that of a 1-D slice (for IndexRange reads)."""

    def __init__(self, tag: Any) -> None:
        self._tag = tag
        self.shape = (0,)
        self.data_type = tag.data_type
