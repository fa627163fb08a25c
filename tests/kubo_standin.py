"""A stand-in for Kubo's RPC API, for tests on machines with no IPFS daemon.

It follows the shapes in Kubo's RPC reference (docs.ipfs.tech/reference/kubo/rpc) and in
go-ipfs-cmds, which serves that API:

* every command is ``POST /api/v0/<command>``; GET answers 405, unknown commands 404;
* arguments come in the query string (``arg`` repeated, flags by name);
* errors are HTTP 500 (400 for a bad request) with ``{"Message", "Code", "Type": "error"}``;
* ``add`` reads ``multipart/form-data`` parts named with query-escaped paths
  ("reg%2Fblockchain.json"), folders as ``application/x-directory`` parts, and answers one
  JSON line per file and folder: ``{"Name", "Hash", "Size"}``, files first, then folders
  innermost first.

CIDs come from the production hashing code, so a test of the client against this server
also checks that Kubo-shaped requests produce the CIDs the embedded store computes.
Content lives in memory. Deliberate simplifications: the node is "offline" (a block it
lacks is an immediate error, where Kubo would search the network), and IPNS records are
a plain dictionary.

Start it with ``with running_kubo_standin() as kubo: kubo.url``. The listening socket is
bound before the server thread starts, so it is ready as soon as the ``with`` is entered.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

from dllm_p2p.registry import ipfs

_ERR_NORMAL, _ERR_CLIENT = 0, 1  # go-ipfs-cmds ErrorType values
_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}  # Go's ParseBool


class _RpcError(Exception):
    def __init__(self, message: str, code: int = _ERR_NORMAL) -> None:
        super().__init__(message)
        self.code = code


class KuboStandin:
    """The node's state (blocks, pins, keys, IPNS records) and its HTTP server."""

    def __init__(self) -> None:
        self.blocks: dict[str, bytes] = {}
        self.pins: set[str] = set()
        self.keys: dict[str, str] = {"self": _ipns_name()}
        self.records: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        standin = self

        class Handler(_Handler):
            node = standin

        # The constructor binds and listens: connections queue in the backlog until
        # serve_forever picks them up, so no readiness polling is needed.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="kubo-standin", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def load(self, cid: str) -> bytes:
        try:
            return self.blocks[cid]
        except KeyError:
            raise ipfs.ContentNotFound(f"block was not found locally (offline): ipld: could not find {cid}") from None

    # -- commands: each takes (args, options, request body) and returns (body, headers) --

    def cmd_version(self, args: list[str], opts: dict[str, str], _body: Any) -> dict:
        return {"Version": "0.39.0", "Commit": "standin", "Repo": "18", "System": "amd64/linux", "Golang": "go1.25.4"}

    def cmd_add(self, args: list[str], opts: dict[str, str], body: Any) -> list[dict]:
        if _flag(opts, "cid-version", "0") != "0" or _bool(opts, "raw-leaves", False):
            raise _RpcError("the stand-in only builds CIDv0 with UnixFS leaves", _ERR_CLIENT)
        chunker = _flag(opts, "chunker", f"size-{ipfs.CHUNK_SIZE}")
        if not chunker.startswith("size-") or not chunker[5:].isdigit():
            raise _RpcError(f"unrecognized chunker option: {chunker}", _ERR_CLIENT)
        parts = body
        if not parts:
            raise _RpcError('file argument "path" is required', _ERR_CLIENT)
        tree = _tree_from_parts(parts)
        if _bool(opts, "wrap-with-directory", False):
            tops: list[tuple[str, Any]] = [("", tree)]
        else:
            tops = list(tree.items())
        only_hash, pin = _bool(opts, "only-hash", False), _bool(opts, "pin", True)
        sink = None if only_hash else self.blocks.__setitem__
        events: list[dict] = []
        for name, entry in tops:
            with self._lock:
                root = _add_entry(name, entry, sink, int(chunker[5:]), events)
                if pin and not only_hash:
                    self.pins.add(root.cid)
        return events

    def cmd_cat(self, args: list[str], opts: dict[str, str], _body: Any) -> bytes:
        path = _required(args, "ipfs-path")
        if path.startswith("/ipns/"):
            path = self._resolve(path)
        try:
            return ipfs.cat_dag(path, self.load, max_bytes=1 << 30)
        except ipfs.ContentError as exc:
            if "is not a file" in str(exc):
                raise _RpcError("this dag node is a directory") from None
            raise _RpcError(str(exc)) from None

    def cmd_pin_add(self, args: list[str], opts: dict[str, str], _body: Any) -> dict:
        _required(args, "ipfs-path")
        pinned = []
        for arg in args:
            cid, names = ipfs.parse_ipfs_path(arg) if _is_path(arg) else (None, [])
            if cid is None or names:
                raise _RpcError(f"invalid path {arg!r}: the stand-in pins CIDs only")
            self.load(cid)  # offline: the root must be here
            with self._lock:
                self.pins.add(cid)
            pinned.append(cid)
        return {"Pins": pinned}

    def cmd_name_publish(self, args: list[str], opts: dict[str, str], _body: Any) -> dict:
        target = _required(args, "ipfs-path")
        if not (target.startswith("/ipns/") or _is_path(target)):
            raise _RpcError(f"invalid path {target!r}")
        if not target.startswith(("/ipfs/", "/ipns/")):
            target = f"/ipfs/{target}"
        key = _flag(opts, "key", "self")
        name = self.keys.get(key) or (key if key in self.keys.values() else None)
        if name is None:
            raise _RpcError("no key by the given name was found")
        with self._lock:
            self.records[name] = target
        return {"Name": name, "Value": target}

    def cmd_name_resolve(self, args: list[str], opts: dict[str, str], _body: Any) -> dict:
        name = args[0] if args else self.keys["self"]
        return {"Path": self._resolve(name)}

    def _resolve(self, name: str) -> str:
        path = name if name.startswith("/ipns/") else f"/ipns/{name}"
        for _ in range(32):  # recursive=true: follow /ipns/ -> /ipns/ chains
            if not path.startswith("/ipns/"):
                return path
            head, _, rest = path[len("/ipns/") :].partition("/")
            target = self.records.get(head)
            if target is None:
                raise _RpcError(f"could not resolve name: {name!r}: routing: not found")
            path = target + (f"/{rest}" if rest else "")
        raise _RpcError("could not resolve name (recursion limit exceeded)")

    def cmd_key_gen(self, args: list[str], opts: dict[str, str], _body: Any) -> dict:
        name = _required(args, "name")
        if _flag(opts, "type", "ed25519") != "ed25519":
            raise _RpcError("the stand-in only generates ed25519 keys", _ERR_CLIENT)
        with self._lock:
            if name == "self":
                raise _RpcError("cannot create key with name 'self'")
            if name in self.keys:
                raise _RpcError(f"key with name '{name}' already exists")
            self.keys[name] = _ipns_name()
        return {"Name": name, "Id": self.keys[name]}

    def cmd_key_list(self, args: list[str], opts: dict[str, str], _body: Any) -> dict:
        return {"Keys": [{"Name": name, "Id": key_id} for name, key_id in self.keys.items()]}


_COMMANDS = {
    "version": KuboStandin.cmd_version,
    "add": KuboStandin.cmd_add,
    "cat": KuboStandin.cmd_cat,
    "pin/add": KuboStandin.cmd_pin_add,
    "name/publish": KuboStandin.cmd_name_publish,
    "name/resolve": KuboStandin.cmd_name_resolve,
    "key/gen": KuboStandin.cmd_key_gen,
    "key/list": KuboStandin.cmd_key_list,
    "key/ls": KuboStandin.cmd_key_list,
}


class _Handler(BaseHTTPRequestHandler):
    node: KuboStandin
    protocol_version = "HTTP/1.1"  # keep-alive, like Go's server; every answer has a length

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _not_allowed(self) -> None:
        self.node.requests.append((self.command, self.path))
        self._read_body()
        self._send(405, b"405 - Method Not Allowed\n", "text/plain; charset=utf-8", {"Allow": "OPTIONS, POST"})

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_POST(self) -> None:
        self.node.requests.append((self.command, self.path))
        url = urlsplit(self.path)
        raw = self._read_body()
        command = url.path.removeprefix("/api/v0/") if url.path.startswith("/api/v0/") else None
        handler = _COMMANDS.get(command or "")
        if handler is None:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        query = parse_qs(url.query, keep_blank_values=True)
        args = query.pop("arg", [])
        opts = {name: values[-1] for name, values in query.items()}
        try:
            body = _parse_multipart(self.headers.get("Content-Type", ""), raw) if command == "add" else None
            result = handler(self.node, args, opts, body)
        except (_RpcError, ipfs.IpfsError, ValueError) as exc:
            code = exc.code if isinstance(exc, _RpcError) else _ERR_NORMAL
            error = {"Message": str(exc), "Code": code, "Type": "error"}
            self._send(400 if code == _ERR_CLIENT else 500, _json(error) + b"\n", "application/json")
            return
        common = {"Trailer": "X-Stream-Error", "Vary": "Origin"}
        if isinstance(result, bytes):  # cat: a stream of file bytes
            headers = {**common, "X-Stream-Output": "1", "X-Content-Length": str(len(result))}
            self._send(200, result, "text/plain", headers)
        elif isinstance(result, list):  # add: a channel of events, one JSON value per line
            lines = b"".join(_json(event) + b"\n" for event in result)
            self._send(200, lines, "application/json", {**common, "X-Chunked-Output": "1"})
        else:
            self._send(200, _json(result) + b"\n", "application/json", common)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


# --- helpers ----------------------------------------------------------------------------


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # Go's compact encoding


def _required(args: list[str], name: str) -> str:
    if not args:
        raise _RpcError(f'argument "{name}" is required', _ERR_CLIENT)
    return args[0]


def _flag(opts: dict[str, str], name: str, default: str) -> str:
    return opts.get(name, default)


def _bool(opts: dict[str, str], name: str, default: bool) -> bool:
    if name not in opts:
        return default
    value = opts[name].lower()
    if value not in _BOOLS:
        raise _RpcError(f'strconv.ParseBool: parsing "{opts[name]}": invalid syntax', _ERR_CLIENT)
    return _BOOLS[value]


def _is_path(text: str) -> bool:
    try:
        ipfs.parse_ipfs_path(text)
    except ipfs.ContentError:
        return False
    return True


def _ipns_name() -> str:
    """A fresh IPNS name shaped like Kubo's: base36 CIDv1, libp2p-key codec, identity
    multihash of an ed25519 public key protobuf ("k51qzi5uqu5d...")."""
    public_key = b"\x08\x01\x12\x20" + os.urandom(32)
    raw = b"\x01\x72\x00" + bytes([len(public_key)]) + public_key
    number, digits = int.from_bytes(raw, "big"), []
    while number:
        number, rem = divmod(number, 36)
        digits.append("0123456789abcdefghijklmnopqrstuvwxyz"[rem])
    return "k" + "".join(reversed(digits))


def _parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """(file name, content type, content) of each part, names unescaped like boxo's
    ``fileName``: QueryUnescape, then ``path.Clean("/" + name)``."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        return []
    boundary = None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"').encode()
    if not boundary:
        raise _RpcError("multipart body has no boundary", _ERR_CLIENT)
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        filename = ""
        for param in headers.get("content-disposition", "").split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "filename":
                filename = value.strip('"')
        name = posixpath.normpath("/" + unquote_plus(filename)).lstrip("/")
        parts.append((name, headers.get("content-type", "application/octet-stream"), content))
    return parts


def _tree_from_parts(parts: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    """Folders as nested dicts, files as bytes; parent folders are implied by paths."""
    tree: dict[str, Any] = {}
    for name, content_type, content in parts:
        *folders, leaf = name.split("/")
        where = tree
        for folder in folders:
            where = where.setdefault(folder, {})
        if content_type.split(";")[0].strip() == "application/x-directory":
            where.setdefault(leaf, {})
        elif content_type.split(";")[0].strip() == "application/symlink":
            raise _RpcError("the stand-in does not store symlinks")
        else:
            where[leaf] = content
    return tree


def _add_entry(name: str, entry: Any, sink: Any, chunk_size: int, events: list[dict]) -> ipfs.DagNode:
    """Build ``entry``, appending Kubo's events: files first, then folders deepest first
    and in name order (Kubo's ``outputDirs``). Kubo lists files in upload order; here they
    come in name order, which is the order ``KuboClient`` uploads them in."""
    folders: list[dict] = []

    def build(path: str, node: Any) -> ipfs.DagNode:
        if isinstance(node, bytes):
            dag = ipfs.build_dag(node, sink=sink, chunk_size=chunk_size)
            events.append({"Name": path, "Hash": dag.cid, "Size": str(dag.dag_size)})
            return dag
        children = {child: build(posixpath.join(path, child), node[child]) for child in sorted(node)}
        dag = ipfs.build_directory(children, sink=sink)
        folders.append({"Name": path, "Hash": dag.cid, "Size": str(dag.dag_size)})
        return dag

    root = build(name, entry)
    events.extend(folders)
    return root


@contextmanager
def running_kubo_standin() -> Iterator[KuboStandin]:
    """A started stand-in on 127.0.0.1 (an ephemeral port); stopped on exit."""
    node = KuboStandin()
    node.start()
    try:
        yield node
    finally:
        node.stop()
