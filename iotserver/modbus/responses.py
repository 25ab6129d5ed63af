"""Modbus TCP response encoders: MBAP header + response PDU, packed in one ``struct`` call
where possible, for exceptions (MB AP 7), reads, writes, Report Server ID and Read Device
Identification (``device_id_response`` answers the latter from the server's object table).
Re-exported by ``iotserver.modbus.codec``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from iotserver.modbus.encoding import pack_bits
from iotserver.modbus.mbap import (
    _MAX_PDU,
    DeviceIdCode,
    ExceptionCode,
    ModbusUsageError,
)
from iotserver.modbus.pdu import (
    MaskWrite,
    ReadDeviceId,
    WriteCoil,
    WriteCoils,
    WriteRegister,
    WriteRegisters,
)

# ---------------------------------------------------------------------------------------------
# responses: MBAP + PDU in one pack where possible (these run once per request)

# MB TCP 3.1.3: MBAP = transaction id, protocol id (0), length (unit id + PDU), unit id.
# Defined here, not imported: a method call on an imported name compiles to LOAD_ATTR
# instead of LOAD_METHOD (as CPython 3.11 does).
_MBAP = struct.Struct(">HHHB")
_RSP_BYTES = struct.Struct(">HHHBBB")  # MBAP, fc, byte count
_RSP_EXC = struct.Struct(">HHHBBB")  # MBAP, fc|0x80, exception code
_RSP_U16x2 = struct.Struct(">HHHBBHH")  # MBAP, fc, two 16-bit fields
_RSP_U16x3 = struct.Struct(">HHHBBHHH")


def encode_pdu(tid: int, unit: int, pdu: bytes | bytearray | memoryview) -> bytes:
    """Wrap any response PDU in an MBAP header (MB TCP 3.1.3)."""
    if not 1 <= len(pdu) <= _MAX_PDU:
        raise ModbusUsageError(f"PDU of {len(pdu)} bytes, must be 1..{_MAX_PDU}")
    return _MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu


def encode_exception(tid: int, unit: int, fc: int, code: int) -> bytes:
    """MB AP 7: exception response, function code with the high bit set."""
    return _RSP_EXC.pack(tid, 0, 3, unit, (fc | 0x80) & 0xFF, code)


def encode_read_registers_response(
    tid: int, unit: int, fc: int, register_bytes: bytes | bytearray | memoryview
) -> bytes:
    """FC03/04/17 response (MB AP 6.3): ``register_bytes`` are already big-endian."""
    n = len(register_bytes)
    if n & 1 or not 2 <= n <= 250:
        raise ModbusUsageError(f"{n} register bytes: must be even, 2..250")
    return _RSP_BYTES.pack(tid, 0, n + 3, unit, fc, n) + register_bytes


def encode_read_bits_response(
    tid: int,
    unit: int,
    fc: int,
    bits: npt.NDArray[np.bool_] | bytes | bytearray | memoryview,
) -> bytes:
    """FC01/02 response (MB AP 6.1): bits packed LSB-first, last byte zero-padded.

    A numpy array is one element per bit; bytes-like input is taken as already packed.
    """
    packed = pack_bits(bits) if isinstance(bits, np.ndarray) else bits
    n = len(packed)
    if not 1 <= n <= 250:
        raise ModbusUsageError(f"{n} coil bytes: must be 1..250")
    return _RSP_BYTES.pack(tid, 0, n + 3, unit, fc, n) + packed


def encode_write_coil_response(tid: int, unit: int, address: int, value: bool) -> bytes:
    """FC05 response: echo of the request (MB AP 6.5)."""
    return _RSP_U16x2.pack(tid, 0, 6, unit, 0x05, address, 0xFF00 if value else 0x0000)


def encode_write_register_response(tid: int, unit: int, address: int, value: int) -> bytes:
    """FC06 response: echo of the request (MB AP 6.6)."""
    return _RSP_U16x2.pack(tid, 0, 6, unit, 0x06, address, value)


def encode_write_multiple_response(tid: int, unit: int, fc: int, address: int, count: int) -> bytes:
    """FC0F/10 response: function, starting address, quantity (MB AP 6.11, 6.12)."""
    return _RSP_U16x2.pack(tid, 0, 6, unit, fc, address, count)


def encode_mask_write_response(
    tid: int, unit: int, address: int, and_mask: int, or_mask: int
) -> bytes:
    """FC16 response: echo of the request (MB AP 6.16)."""
    return _RSP_U16x3.pack(tid, 0, 8, unit, 0x16, address, and_mask, or_mask)


def encode_write_response(
    tid: int,
    unit: int,
    request: WriteCoil | WriteRegister | WriteCoils | WriteRegisters | MaskWrite,
) -> bytes:
    """The normal response to any write request."""
    if isinstance(request, WriteCoil):
        return encode_write_coil_response(tid, unit, request.address, request.value)
    if isinstance(request, WriteRegister):
        return encode_write_register_response(tid, unit, request.address, request.value)
    if isinstance(request, MaskWrite):
        return encode_mask_write_response(
            tid, unit, request.address, request.and_mask, request.or_mask
        )
    return encode_write_multiple_response(
        tid, unit, request.function, request.address, request.count
    )


def encode_report_server_id_response(
    tid: int, unit: int, server_id: bytes, running: bool = True, additional: bytes = b""
) -> bytes:
    """FC11 response (MB AP 6.13): byte count, server id, run indicator (0x00/0xFF), extra."""
    data = server_id + (b"\xff" if running else b"\x00") + additional
    if len(data) > _MAX_PDU - 2:
        raise ModbusUsageError("server id data too long")
    return encode_pdu(tid, unit, bytes((0x11, len(data))) + data)


def encode_read_device_id_response(
    tid: int,
    unit: int,
    code: int,
    conformity: int,
    objects: Iterable[tuple[int, bytes]],
    more_follows: bool = False,
    next_object_id: int = 0,
) -> bytes:
    """FC2B/0E response (MB AP 6.21) with the given objects, as-is."""
    body = bytearray()
    count = 0
    for obj_id, value in objects:
        if len(value) > 255:
            raise ModbusUsageError(f"device id object {obj_id:#x} longer than 255 bytes")
        body += bytes((obj_id, len(value))) + value
        count += 1
    head = bytes(
        (0x2B, 0x0E, code, conformity, 0xFF if more_follows else 0x00, next_object_id, count)
    )
    return encode_pdu(tid, unit, head + body)


# MB AP 6.21: object id ranges per category
_CATEGORY_LAST = {DeviceIdCode.BASIC: 0x02, DeviceIdCode.REGULAR: 0x7F, DeviceIdCode.EXTENDED: 0xFF}


def device_id_response(
    tid: int, unit: int, request: ReadDeviceId, objects: Mapping[int, bytes]
) -> bytes:
    """Answer a Read Device Identification request from the server's object table.

    Stream access (codes 01..03) returns the category's objects from ``object_id`` on, split
    with More Follows / Next Object Id when they exceed one PDU; an unknown start object
    restarts at 0. Individual access (04) of a missing object gets exception 02 (MB AP 6.21).
    Conformity level: highest category present, plus 0x80 (individual access supported).
    """
    fc = 0x2B
    if any(i > 0x7F for i in objects):
        conformity = 0x83
    elif any(i > 0x02 for i in objects):
        conformity = 0x82
    else:
        conformity = 0x81
    code = request.code
    if code is DeviceIdCode.INDIVIDUAL:
        value = objects.get(request.object_id)
        if value is None:
            return encode_exception(tid, unit, fc, ExceptionCode.ILLEGAL_DATA_ADDRESS)
        return encode_read_device_id_response(
            tid, unit, code, conformity, [(request.object_id, value[: _MAX_PDU - 9])]
        )
    last = _CATEGORY_LAST[code]
    ids = sorted(i for i in objects if 0 <= i <= last)
    start = request.object_id if request.object_id in ids else 0
    room = _MAX_PDU - 7  # fc, MEI, code, conformity, more follows, next id, count
    chosen: list[tuple[int, bytes]] = []
    more, next_id = False, 0
    for obj_id in ids:
        if obj_id < start:
            continue
        value = objects[obj_id][: _MAX_PDU - 9]
        if 2 + len(value) > room:
            more, next_id = True, obj_id
            break
        chosen.append((obj_id, value))
        room -= 2 + len(value)
    return encode_read_device_id_response(tid, unit, code, conformity, chosen, more, next_id)
