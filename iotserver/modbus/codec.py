"""Sans-I/O Modbus TCP codec, server side: bytes in, requests out; responses -> bytes.

References: "MODBUS Application Protocol Specification V1.1b3" (MB AP) and "MODBUS Messaging
on TCP/IP Implementation Guide V1.0b" (MB TCP). No sockets, no reactor: the Twisted protocol
feeds :class:`FrameDecoder`, parses each frame's PDU with :func:`parse_request`, checks the
request's :attr:`accesses` against its register map, and writes one of the ``encode_*`` results.

Two kinds of failure, as in h11:
- :class:`ModbusFramingError`: the peer broke MBAP framing; the stream cannot be resynchronised,
  so the server closes the connection (MB TCP 4.4.1.2 says to discard; without a valid length
  there is nothing to discard up to).
- :class:`ExceptionResponse` (a value, not an exception): the frame was valid but the request is
  not; answer it with :func:`encode_exception`.

This module is the public facade; the code lives in ``mbap.py`` (errors, code enums, MBAP
framing), ``pdu.py`` (request dataclasses, :func:`parse_request`) and ``responses.py``
(the ``encode_*`` response encoders, :func:`device_id_response`).
"""

from __future__ import annotations

from iotserver.modbus.mbap import (
    ALL_FUNCTIONS,
    DeviceIdCode,
    ExceptionCode,
    Frame,
    FrameDecoder,
    FunctionCode,
    MeiType,
    ModbusError,
    ModbusFramingError,
    ModbusUsageError,
    Table,
)
from iotserver.modbus.pdu import (
    Access,
    ExceptionResponse,
    MaskWrite,
    ReadBits,
    ReadDeviceId,
    ReadRegisters,
    ReadWriteRegisters,
    ReportServerId,
    Request,
    WriteCoil,
    WriteCoils,
    WriteRegister,
    WriteRegisters,
    parse_request,
)
from iotserver.modbus.responses import (
    device_id_response,
    encode_exception,
    encode_mask_write_response,
    encode_pdu,
    encode_read_bits_response,
    encode_read_device_id_response,
    encode_read_registers_response,
    encode_report_server_id_response,
    encode_write_coil_response,
    encode_write_multiple_response,
    encode_write_register_response,
    encode_write_response,
)

__all__ = [
    "ALL_FUNCTIONS",
    "Access",
    "DeviceIdCode",
    "ExceptionCode",
    "ExceptionResponse",
    "Frame",
    "FrameDecoder",
    "FunctionCode",
    "MaskWrite",
    "MeiType",
    "ModbusError",
    "ModbusFramingError",
    "ModbusUsageError",
    "ReadBits",
    "ReadDeviceId",
    "ReadRegisters",
    "ReadWriteRegisters",
    "ReportServerId",
    "Request",
    "Table",
    "WriteCoil",
    "WriteCoils",
    "WriteRegister",
    "WriteRegisters",
    "device_id_response",
    "encode_exception",
    "encode_mask_write_response",
    "encode_pdu",
    "encode_read_bits_response",
    "encode_read_device_id_response",
    "encode_read_registers_response",
    "encode_report_server_id_response",
    "encode_write_coil_response",
    "encode_write_multiple_response",
    "encode_write_register_response",
    "encode_write_response",
    "parse_request",
]
