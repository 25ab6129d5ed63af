"""Browse paging and result masks: RequestedMaxReferencesPerNode, BrowseNext and ResultMask
(OPC UA Part 4 5.8.2, 5.8.3).

asyncua answers Browse with every reference of a node, whatever limit the client asked for,
and has no BrowseNext at all (its processor answers Bad_ServiceUnsupported). Clients that page
their browsing (node-opcua's crawler, UaExpert and most SCADA address-space importers ask for
a few hundred or thousand references per node) then get more than they asked for, or fail on
a large folder. :class:`ContinuationPoints` is the per-session state that fixes both:

* a Browse result longer than the client's limit is cut to the limit, and the rest is kept
  behind a continuation point (Part 4 7.9: an opaque ByteString);
* BrowseNext hands out the next page, or releases the points when the client says so;
* at most ``limit`` points exist per session (``MaxBrowseContinuationPoints`` in the server's
  capabilities). Points of earlier requests are freed, oldest first, when a new request needs
  room (5.8.2.1); a single request that needs more than the limit gets Bad_NoContinuationPoints
  for the nodes beyond it. A freed or unknown point is Bad_ContinuationPointInvalid.
"""

from __future__ import annotations

import itertools
from asyncua import ua

_ALL_FIELDS = 0x3F  # BrowseResultMask.All: every optional field of a ReferenceDescription


def apply_result_masks(params: ua.BrowseParameters, results: list[ua.BrowseResult]) -> None:
    """Leave out the ReferenceDescription fields a BrowseDescription's ResultMask did not ask
    for (Part 4 5.8.2.2: bit 0 ReferenceTypeId, 1 IsForward, 2 NodeClass, 3 BrowseName,
    4 DisplayName, 5 TypeDefinition; the target NodeId always comes). asyncua fills in every
    field whatever the mask. The address space's own references are shared, so masked ones
    are copies; the usual request (all fields) costs nothing."""
    for desc, res in zip(params.NodesToBrowse, results, strict=True):
        mask = desc.ResultMask & _ALL_FIELDS
        if mask != _ALL_FIELDS and res.References:
            res.References = [_masked(ref, mask) for ref in res.References]


def _masked(ref: ua.ReferenceDescription, mask: int) -> ua.ReferenceDescription:
    out = ua.ReferenceDescription()
    out.NodeId = ref.NodeId
    out.IsForward = bool(mask & 0x02) and ref.IsForward
    if mask & 0x01:
        out.ReferenceTypeId = ref.ReferenceTypeId
    if mask & 0x04:
        out.NodeClass = ref.NodeClass
    if mask & 0x08:
        out.BrowseName = ref.BrowseName
    if mask & 0x10:
        out.DisplayName = ref.DisplayName
    if mask & 0x20:
        out.TypeDefinition = ref.TypeDefinition
    return out


class ContinuationPoints:
    """One session's browse continuation points: id -> (remaining references, page size)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._points: dict[bytes, tuple[list[ua.ReferenceDescription], int]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._points)

    def page_results(self, results: list[ua.BrowseResult], max_refs: int) -> None:
        """Cut every result of one Browse call to ``max_refs`` references (0: no limit)."""
        if not max_refs:
            return
        made: set[bytes] = set()  # points this request created: never freed for itself
        for res in results:
            if len(res.References) <= max_refs or not res.StatusCode.is_good():
                continue
            if len(self._points) >= self.limit and not self._free_oldest(made):
                res.References = []
                res.StatusCode = ua.StatusCode(ua.StatusCodes.BadNoContinuationPoints)
                continue
            cp = self._new_id()
            self._points[cp] = (res.References[max_refs:], max_refs)
            res.References = res.References[:max_refs]
            res.ContinuationPoint = cp
            made.add(cp)

    def browse_next(self, params: ua.BrowseNextParameters) -> list[ua.BrowseResult]:
        """The next page for each point, or release them (5.8.3)."""
        out = []
        for cp in params.ContinuationPoints:
            res = ua.BrowseResult()
            entry = self._points.pop(cp, None) if cp else None
            if entry is None:
                res.StatusCode = ua.StatusCode(ua.StatusCodes.BadContinuationPointInvalid)
            elif not params.ReleaseContinuationPoints:
                refs, max_refs = entry
                res.References = refs[:max_refs]
                if len(refs) > max_refs:  # the same point stands for what is left
                    self._points[cp] = (refs[max_refs:], max_refs)
                    res.ContinuationPoint = cp
            out.append(res)
        return out

    def clear(self) -> None:
        self._points.clear()

    def _new_id(self) -> bytes:
        return next(self._ids).to_bytes(8, "big")

    def _free_oldest(self, keep: set[bytes]) -> bool:
        for cp in self._points:
            if cp not in keep:
                del self._points[cp]
                return True
        return False
