"""RPC servers: a model's layers (and their KV cache) on other machines' memory and compute.

Each host runs ``pyadaq tool rpc-server --host ADDR --port P`` (ggml's RPC server, built from
pyadaq's tree, so it stores and runs pyadaq's cache types); ``pyadaq.Llama(model,
rpc_servers="host1:P1,host2:P2")`` then puts the model's layers on them (all of them unless
``n_gpu_layers`` says otherwise), split by the memory each server reports.

ggml's RPC client ends the process when it cannot reach a server, or when a server goes away
in the middle of a computation: there is no error to catch. So each server is asked first, here,
whether it answers ggml's RPC handshake with a protocol version this build speaks (a
:class:`RPCServerError` otherwise); a server lost while a model uses it still ends the process,
with ggml's message "Remote RPC server crashed or returned malformed response". Run the model
in a process of its own (``pyadaq serve --rpc`` does) when the rest must survive that.

An rpc-server serves one client at a time: a second process using the same server waits for
the first to let go (the check below says so after its timeout).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator, Sequence

from pyadaq._native import native

__all__ = ["RPCServerError", "check_server", "next_model_servers", "parse_servers"]

# ggml/include/ggml-rpc.h and ggml/src/ggml-rpc/ggml-rpc.cpp of the pinned llama.cpp: the
# protocol version this build's client speaks, the HELLO command and its message sizes
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
_CMD_HELLO = 14
_CONN_CAPS = 24
_HELLO_RSP = 4 + _CONN_CAPS


class RPCServerError(ConnectionError):
    """An RPC server that cannot be used: unreachable, not an RPC server, another version."""


def parse_servers(spec: str | Sequence[str]) -> list[str]:
    """``"host:port,host:port"`` (or a sequence of ``"host:port"``) as a list of endpoints;
    ValueError for an entry that is not host:port with a TCP port."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"RPC server '{item}' is not host:port (for example 127.0.0.1:50052)")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"no RPC server in {spec!r}")
    return out


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection was closed")
        data += chunk
    return data


def check_server(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """Connect to an RPC server and do ggml's HELLO handshake; returns the server's protocol
    version, or raises RPCServerError saying what is wrong."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise RPCServerError(f"RPC server {endpoint} cannot be reached: {e.strerror or e} "
                             "(is `pyadaq tool rpc-server` running there?)") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
        (size,) = struct.unpack("<Q", _recv(sock, 8))
        if size != _HELLO_RSP:
            raise RPCServerError(f"{endpoint} answered the RPC handshake with {size} bytes, not {_HELLO_RSP}: "
                                 "not a ggml RPC server of this protocol version")
        major, minor, patch = _recv(sock, _HELLO_RSP)[:3]
    except socket.timeout:
        raise RPCServerError(f"RPC server {endpoint} did not answer within {timeout:g} s (an rpc-server serves one "
                             "client at a time: is another client using it?)") from None
    except (OSError, ConnectionError) as e:
        raise RPCServerError(f"{endpoint} is not a ggml RPC server ({e})") from None
    finally:
        sock.close()
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise RPCServerError(f"RPC server {endpoint} speaks protocol {major}.{minor}.{patch}; this build speaks "
                             f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x (run the rpc-server of the same pyadaq)")
    return major, minor, patch


# endpoints held by models of this process: their server is busy with us, so no handshake
_in_use: dict[str, int] = {}
_in_use_lock = threading.Lock()


def hold(servers: Sequence[str]) -> None:
    with _in_use_lock:
        for s in servers:
            _in_use[s] = _in_use.get(s, 0) + 1


def release(servers: Sequence[str]) -> None:
    with _in_use_lock:
        for s in servers:
            if _in_use.get(s, 0) <= 1:
                _in_use.pop(s, None)
            else:
                _in_use[s] -= 1


def check_servers(servers: Sequence[str], timeout: float = 10.0) -> None:
    """check_server for each server this process does not already use."""
    with _in_use_lock:
        busy = set(_in_use)
    for s in servers:
        if s not in busy:
            check_server(s, timeout)


@contextlib.contextmanager
def next_model_servers(servers: Sequence[str]) -> Iterator[int]:
    """The model loaded on this thread inside the block uses these RPC servers (and, of the
    servers registered this way, no other); yields their device count. Call check_servers first."""
    n = native()
    err = n.ffi.new("char[]", 512)
    got = int(n.llama.pyadaq_next_model_rpc_servers(",".join(servers).encode(), err, len(err)))
    if got < 0:
        raise RPCServerError(n.ffi.string(err).decode("utf-8", "replace"))
    try:
        yield got
    finally:
        n.llama.pyadaq_next_model_rpc_servers(n.ffi.NULL, n.ffi.NULL, 0)
