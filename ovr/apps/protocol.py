"""The Open Inference Protocol (KServe v2 REST, as Triton, KServe, MLServer and OpenVINO Model Server speak it):
request parsing and response building, with numpy only, so the codec is tested without a server.

Supported: JSON tensors, the binary tensor data extension (a JSON header of `Inference-Header-Content-Length`
bytes, then each binary tensor in order; BYTES elements as a 4-byte little-endian length and the bytes), and the
classification extension (an output asked with `"parameters": {"classification": k}` answers the top k per row
as `"score:index:label"` strings).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

PROTOCOL_VERSION = "2"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER = "Inference-Header-Content-Length"

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}


class ProtocolError(Exception):
    """A request the protocol refuses: `status` (400, or 404 for an unknown model) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # BYTES: an object array of bytes
    parameters: dict = field(default_factory=dict)


@dataclass
class Request:
    inputs: list[Tensor]
    outputs: list[dict] | None  # None: every output
    id: str | None = None
    binary_output: bool = False  # the request's "binary_data_output" parameter


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ProtocolError(f"input '{name}': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ProtocolError(f"input '{name}': a BYTES element of {n} bytes runs past the data")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def bytes_array(items: list) -> np.ndarray:
    """A 1-D object array of these bytes (a BYTES tensor's data; numpy would otherwise make fixed-width strings)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def serialize_bytes(items) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _shape(value, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(f"input '{name}': shape must be a list of non-negative integers, got {value!r}")
    return value


def _flat(data) -> list:
    """JSON tensor data, row-major, flattened (the protocol allows nested or flat lists)."""
    if not isinstance(data, list):
        return [data]
    out: list = []
    for d in data:
        out.extend(_flat(d) if isinstance(d, list) else [d])
    return out


def parse_request(body: bytes, header_length: str | None) -> Request:
    """An inference request from its body and its Inference-Header-Content-Length header (None: all JSON)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER} of {header_length!r} does not fit a body of {len(body)} bytes")
        head, rest = body[:int(header_length)], body[int(header_length):]
    else:
        head, rest = body, b""
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the request is not JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ProtocolError("the request needs an 'inputs' list with at least one tensor")
    params = req.get("parameters") or {}
    offset, inputs = 0, []
    for t in req["inputs"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise ProtocolError("each input needs a 'name', a 'datatype' and a 'shape'")
        name, dtype, shape = t["name"], t["datatype"], _shape(t.get("shape"), t.get("name"))
        p = t.get("parameters") or {}
        size = p.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(rest):
                raise ProtocolError(f"input '{name}': binary_data_size {size!r} runs past the body")
            raw, offset = rest[offset:offset + size], offset + size
            if dtype == "BYTES":
                data = bytes_array(_bytes_elements(raw, name))
            elif dtype in DTYPES:
                itemsize = np.dtype(DTYPES[dtype]).itemsize
                if len(raw) % itemsize:
                    raise ProtocolError(f"input '{name}': {len(raw)} bytes is not a whole number of {dtype}")
                data = np.frombuffer(raw, DTYPES[dtype])
            else:
                raise ProtocolError(f"input '{name}': unsupported datatype {dtype}")
        else:
            if "data" not in t:
                raise ProtocolError(f"input '{name}' has no 'data' and no binary_data_size")
            flat = _flat(t["data"])
            if dtype == "BYTES":
                data = bytes_array([s.encode() if isinstance(s, str) else s for s in flat])
                if not all(isinstance(s, bytes) for s in data):
                    raise ProtocolError(f"input '{name}': BYTES data must be strings")
            elif dtype in DTYPES:
                try:
                    data = np.asarray(flat, dtype=DTYPES[dtype])
                except (TypeError, ValueError, OverflowError):
                    raise ProtocolError(f"input '{name}': data is not {dtype}") from None
            else:
                raise ProtocolError(f"input '{name}': unsupported datatype {dtype}")
        if data.size != int(np.prod(shape)):
            raise ProtocolError(f"input '{name}': {data.size} elements for shape {shape}")
        inputs.append(Tensor(name, dtype, shape, data.reshape(shape), p))
    outputs = req.get("outputs")
    if outputs is not None and (not isinstance(outputs, list)
                                or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    rid = req.get("id")
    return Request(inputs, outputs, rid if isinstance(rid, str) else None, bool(params.get("binary_data_output")))


def classification(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """The classification extension: [B, k] "score:index:label" strings, highest score first."""
    k = max(1, min(int(k), scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return bytes_array([f"{scores[r, j]:.6f}:{j}:{labels[j]}".encode()
                     for r, row in enumerate(order) for j in row]).reshape(len(scores), k)


def build_response(model_name: str, version: str, request: Request, outputs: dict[str, np.ndarray],
                   labels: list[str], score_outputs: set[str]) -> tuple[bytes, int | None]:
    """(body, header_length or None) for the outputs the request asked for (all when it named none). Outputs in
    `score_outputs` ([B, N] per class) may be asked with the classification parameter."""
    asked = request.outputs if request.outputs is not None else [{"name": n} for n in outputs]
    body: list[dict] = []
    blobs: list[bytes] = []
    for o in asked:
        name, p = o["name"], o.get("parameters") or {}
        if name not in outputs:
            raise ProtocolError(f"unknown output '{name}'; this model has {', '.join(outputs)}")
        arr = outputs[name]
        k = p.get("classification")
        if k is not None:
            if name not in score_outputs or not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ProtocolError(f"output '{name}': classification needs a positive integer on a per-class output")
            arr = classification(arr, k, labels)
        dtype = "BYTES" if arr.dtype == object else next(d for d, t in DTYPES.items() if np.dtype(t) == arr.dtype)
        entry = {"name": name, "datatype": dtype, "shape": list(arr.shape)}
        if p.get("binary_data", request.binary_output):
            raw = serialize_bytes(arr.ravel()) if dtype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = ([b.decode() for b in arr.ravel()] if dtype == "BYTES" else arr.ravel().tolist())
        body.append(entry)
    head = {"model_name": model_name, "model_version": version, "outputs": body}
    if request.id is not None:
        head["id"] = request.id
    text = json.dumps(head).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)
