"""Browse continuation points (iotserver.opcua.browse), byte for byte what a session keeps."""

from __future__ import annotations

from asyncua import ua

from iotserver.opcua.browse import ContinuationPoints, apply_result_masks


def refs(n: int, tag: str = "r") -> list[ua.ReferenceDescription]:
    out = []
    for i in range(n):
        ref = ua.ReferenceDescription()
        ref.BrowseName = ua.QualifiedName(f"{tag}{i}", 2)
        out.append(ref)
    return out


def result(n: int, tag: str = "r") -> ua.BrowseResult:
    res = ua.BrowseResult()
    res.References = refs(n, tag)
    return res


def names(res: ua.BrowseResult) -> list[str]:
    return [r.BrowseName.Name for r in res.References]


def next_page(cps: ContinuationPoints, cp: bytes, release: bool = False) -> ua.BrowseResult:
    params = ua.BrowseNextParameters()
    params.ReleaseContinuationPoints = release
    params.ContinuationPoints = [cp]
    return cps.browse_next(params)[0]


def test_no_limit_or_short_results_are_untouched() -> None:
    cps = ContinuationPoints(2)
    results = [result(5), result(2)]
    cps.page_results(results, 0)
    assert [len(r.References) for r in results] == [5, 2] and len(cps) == 0
    cps.page_results(results, 5)
    assert all(not r.ContinuationPoint for r in results) and len(cps) == 0


def test_pages_until_done_then_the_point_is_gone() -> None:
    cps = ContinuationPoints(2)
    res = result(7)
    cps.page_results([res], 3)
    assert names(res) == ["r0", "r1", "r2"] and len(res.ContinuationPoint) == 8
    cp = res.ContinuationPoint
    page = next_page(cps, cp)
    assert names(page) == ["r3", "r4", "r5"] and page.ContinuationPoint == cp
    page = next_page(cps, cp)
    assert names(page) == ["r6"] and not page.ContinuationPoint and len(cps) == 0
    page = next_page(cps, cp)
    assert page.StatusCode.value == ua.StatusCodes.BadContinuationPointInvalid


def test_release_frees_and_unknown_points_are_invalid() -> None:
    cps = ContinuationPoints(2)
    res = result(4)
    cps.page_results([res], 1)
    freed = next_page(cps, res.ContinuationPoint, release=True)
    assert freed.StatusCode.is_good() and freed.References == [] and len(cps) == 0
    assert next_page(cps, b"\x00" * 8).StatusCode.value == \
        ua.StatusCodes.BadContinuationPointInvalid
    assert next_page(cps, b"").StatusCode.value == ua.StatusCodes.BadContinuationPointInvalid


def test_a_new_request_frees_the_oldest_points_of_earlier_ones() -> None:
    cps = ContinuationPoints(2)
    a, b = result(3, "a"), result(3, "b")
    cps.page_results([a], 1)
    cps.page_results([b], 1)
    c = result(3, "c")
    cps.page_results([c], 1)  # Part 4 5.8.2.1: the oldest point (a) makes room
    assert len(cps) == 2 and c.ContinuationPoint
    assert next_page(cps, a.ContinuationPoint).StatusCode.value == \
        ua.StatusCodes.BadContinuationPointInvalid
    assert names(next_page(cps, b.ContinuationPoint)) == ["b1"]


def test_one_request_needing_more_points_than_allowed() -> None:
    cps = ContinuationPoints(2)
    results = [result(3, "a"), result(3, "b"), result(3, "c")]
    cps.page_results(results, 1)
    assert [bool(r.ContinuationPoint) for r in results] == [True, True, False]
    assert results[2].StatusCode.value == ua.StatusCodes.BadNoContinuationPoints
    assert results[2].References == []


def test_bad_results_are_left_alone() -> None:
    cps = ContinuationPoints(2)
    res = result(3)
    res.StatusCode = ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)
    cps.page_results([res], 1)
    assert len(res.References) == 3 and not res.ContinuationPoint


def full_ref(name: str) -> ua.ReferenceDescription:
    ref = ua.ReferenceDescription()
    ref.ReferenceTypeId = ua.NodeId(ua.ObjectIds.Organizes)
    ref.IsForward = True
    ref.NodeId = ua.ExpandedNodeId(name, 2)
    ref.BrowseName = ua.QualifiedName(name, 2)
    ref.DisplayName = ua.LocalizedText(name)
    ref.NodeClass = ua.NodeClass.Variable
    ref.TypeDefinition = ua.ExpandedNodeId(ua.ObjectIds.BaseDataVariableType)
    return ref


def masked(mask: int) -> tuple[ua.ReferenceDescription, ua.ReferenceDescription]:
    """(the address space's reference, what a Browse with ``mask`` returns for it)."""
    desc = ua.BrowseDescription()
    desc.ResultMask = mask
    params = ua.BrowseParameters()
    params.NodesToBrowse = [desc]
    res = ua.BrowseResult()
    original = full_ref("T")
    res.References = [original]
    apply_result_masks(params, [res])
    assert original == full_ref("T")  # the address space's reference is not touched
    return original, res.References[0]


def test_result_mask_all_keeps_the_same_objects() -> None:
    original, returned = masked(ua.BrowseResultMask.All)
    assert returned is original


def test_result_mask_fields() -> None:
    empty = ua.ReferenceDescription()
    only_name = masked(0x08)[1]  # BrowseName
    assert only_name.BrowseName == ua.QualifiedName("T", 2)
    assert only_name.NodeId == ua.ExpandedNodeId("T", 2)  # always returned
    assert only_name.DisplayName == empty.DisplayName and only_name.NodeClass == 0
    assert only_name.ReferenceTypeId == empty.ReferenceTypeId and only_name.IsForward is False
    assert only_name.TypeDefinition == empty.TypeDefinition
    some = masked(0x01 | 0x02 | 0x04 | 0x20)[1]
    assert some.ReferenceTypeId == ua.NodeId(ua.ObjectIds.Organizes) and some.IsForward
    assert some.NodeClass == ua.NodeClass.Variable
    assert some.TypeDefinition == ua.ExpandedNodeId(ua.ObjectIds.BaseDataVariableType)
    assert some.BrowseName == empty.BrowseName and some.DisplayName == empty.DisplayName
    assert masked(0x10)[1].DisplayName == ua.LocalizedText("T")
