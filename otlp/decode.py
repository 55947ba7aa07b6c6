"""OTLP/HTTP request bodies in (binary protobuf or JSON, optionally gzip), responses out.

OTLP/JSON is the protobuf JSON mapping with two exceptions that ``json_format`` alone would get
wrong: trace and span ids are hex strings (not base64), and receivers ignore unknown fields.
Responses use the request's encoding: an ``ExportTraceServiceResponse`` (with
``partial_success`` when spans were rejected), or a ``google.rpc.Status`` for a refused request.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = [
    "JSON",
    "MAX_BODY_BYTES",
    "PROTOBUF",
    "RequestError",
    "decode_request",
    "encode_response",
    "encode_status",
    "encoding_of",
]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_BODY_BYTES = 16 << 20
"""after decompression; an exporter's default batch of 512 spans is well under 1 MiB"""

_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


@dataclass(frozen=True)
class RequestError(Exception):
    """A request refused whole: HTTP ``status`` and a message for the client."""

    status: int
    message: str

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def encoding_of(content_type: str | None) -> str | None:
    """PROTOBUF, JSON, or None for a content type OTLP/HTTP does not define."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == PROTOBUF:
        return PROTOBUF
    if media == JSON:
        return JSON
    return None


def _gunzip(body: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise RequestError(400, f"Content-Encoding gzip but the body is not gzip: {exc}") from exc
    if len(out) > MAX_BODY_BYTES:
        raise RequestError(413, f"the decompressed body exceeds {MAX_BODY_BYTES} bytes")
    if not inflater.eof:
        raise RequestError(400, "Content-Encoding gzip but the gzip stream is truncated")
    return out


def _hex_ids_to_base64(node: Any) -> None:
    """In place: OTLP/JSON's hex ids as the base64 that ``json_format`` reads for bytes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    raw = bytes.fromhex(value)
                except ValueError as exc:
                    raise RequestError(400, f"{key} must be hex, got {value[:40]!r}") from exc
                node[key] = base64.b64encode(raw).decode()
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def decode_request(
    body: bytes, content_type: str | None, content_encoding: str | None
) -> tuple[ExportTraceServiceRequest, str]:
    """The request and its encoding; ``RequestError`` (415, 400 or 413) when unusable."""
    encoding = encoding_of(content_type)
    if encoding is None:
        raise RequestError(
            415, f"Content-Type must be {PROTOBUF} or {JSON}, got {content_type or 'none'!r}"
        )
    coding = (content_encoding or "identity").strip().lower()
    if coding == "gzip":
        body = _gunzip(body)
    elif coding != "identity":
        raise RequestError(415, f"Content-Encoding must be gzip or identity, got {coding!r}")
    request = ExportTraceServiceRequest()
    if encoding == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise RequestError(400, f"body is not an ExportTraceServiceRequest: {exc}") from exc
        return request, encoding
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise RequestError(400, 'body must be a JSON object {"resourceSpans": [...]}')
    _hex_ids_to_base64(raw)
    try:
        json_format.ParseDict(raw, request, ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error) as exc:
        raise RequestError(400, f"body is not an OTLP/JSON trace export: {exc}") from exc
    return request, encoding


def encode_response(rejected: int, message: str, encoding: str) -> bytes:
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    if encoding == PROTOBUF:
        return bytes(response.SerializeToString())
    return str(json_format.MessageToJson(response, indent=None)).encode()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_status(code: int, message: str, encoding: str | None) -> bytes:
    """A ``google.rpc.Status`` (code, message) as OTLP/HTTP error bodies carry it. Written by
    hand: its two scalar fields do not warrant a dependency on googleapis-common-protos."""
    if encoding == PROTOBUF:
        text = message.encode()
        return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text
    return json.dumps({"code": code, "message": message}).encode()
