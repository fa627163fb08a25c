"""``GET /ipfs/{cid}[/{path}]``: the registry as an IPFS trustless gateway serves it.

What the gateway's node has published (its embedded store: the current registry folder
and a few before it) can be fetched in the two verifiable formats of the trustless
gateway specification (https://specs.ipfs.tech/http-gateways/trustless-gateway/):

* ``Accept: application/vnd.ipld.raw`` (or ``?format=raw``): one block, by CID only;
* ``Accept: application/vnd.ipld.car`` (or ``?format=car``): a CARv1 stream, roots =
  the requested CID, blocks in depth-first order without duplicates: first those that
  prove the path, then the target's DAG as ``dag-scope`` says (``all``, the default,
  ``entity`` or ``block``).

The client checks every block against its CID, so it need not trust this server: the
page fetches the registry this way and checks it by hash. Without either format the
file is answered as is (``application/json`` for ``blockchain.json``), for ``curl``; that
answer is only as trustworthy as the gateway. Blocks the gateway does not hold are 404:
it does not fetch on behalf of HTTP clients.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import trio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dllm_p2p.registry import car
from dllm_p2p.registry.ipfs import (
    _DIRECTORY,
    _FILE,
    _RAW,
    ContentError,
    ContentNotFound,
    EmbeddedStore,
    _decode_node,
    is_cid,
)

RAW = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
CAR_TYPE = f"{CAR}; version=1; order=dfs; dups=n"
IMMUTABLE = "public, max-age=29030400, immutable"
MAX_PATH_NAMES = 16


def _error(status: int, message: str) -> JSONResponse:
    code = {400: "bad_request", 404: "not_found", 406: "not_acceptable"}.get(status, "error")
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _format(request: Request) -> str | None:
    fmt = request.query_params.get("format")
    if fmt in ("raw", "car"):
        return fmt
    accept = request.headers.get("accept", "")
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media == RAW:
            return "raw"
        if media == CAR:
            if "version=2" in part.replace(" ", ""):
                continue  # we only write CARv1
            return "car"
    return None


def _walk(store: EmbeddedStore, cid: str, names: list[str]) -> tuple[list[str], str]:
    """The blocks that prove ``cid/names`` (every directory on the way) and the target."""
    proof: list[str] = []
    for name in names:
        node = _decode_node(cid, store.get_block(cid))
        if node.kind != _DIRECTORY:
            raise ContentNotFound(f"{cid} is not a folder, so it has no {name!r}")
        proof.append(cid)
        link = next((link for link in node.links if link.name == name), None)
        if link is None:
            raise ContentNotFound(f"no link named {name!r} under {cid}")
        cid = link.cid
    return proof, cid


def _car_blocks(store: EmbeddedStore, proof: list[str], target: str, scope: str) -> Iterator[tuple[str, bytes]]:
    seen: set[str] = set()
    for cid in proof:
        seen.add(cid)
        yield cid, store.get_block(cid)
    if scope == "block":
        if target not in seen:
            yield target, store.get_block(target)
        return
    if scope == "entity":
        node = _decode_node(target, store.get_block(target))
        if node.kind not in (_FILE, _RAW):
            if target not in seen:
                yield target, store.get_block(target)
            return
    for cid, block in car.dag_blocks(store, target):
        if cid not in seen:
            seen.add(cid)
            yield cid, block


def add_routes(app: FastAPI, store: Any) -> None:
    """``store()`` gives the node's EmbeddedStore, or None while it has none."""

    @app.get("/ipfs/{cid}", include_in_schema=False)
    @app.get("/ipfs/{cid}/{path:path}", include_in_schema=False)
    async def ipfs(request: Request, cid: str, path: str = "") -> Response:
        blocks: EmbeddedStore | None = store()
        if not is_cid(cid):
            return _error(400, f"{cid!r} is not a CID this gateway can hold (a CIDv0, Qm...)")
        names = [n for n in path.split("/") if n]
        if len(names) > MAX_PATH_NAMES:
            return _error(400, "path too deep")
        fmt = _format(request)
        headers = {"X-Ipfs-Path": "/ipfs/" + "/".join([cid, *names]), "X-Content-Type-Options": "nosniff"}
        if blocks is None or not blocks.has(cid):
            return _error(404, f"{cid} is not held by this gateway (it serves its own registry publications)")
        try:
            if fmt == "raw":
                if names:
                    return _error(400, "a raw block is named by its CID alone: drop the path, or ask for a CAR")
                block = await trio.to_thread.run_sync(blocks.get_block, cid)
                return Response(block, media_type=RAW, headers={
                    **headers, "Cache-Control": IMMUTABLE, "ETag": f'"{cid}.raw"',
                    "Content-Disposition": f'attachment; filename="{cid}.bin"',
                })
            proof, target = await trio.to_thread.run_sync(_walk, blocks, cid, names)
            if fmt == "car":
                scope = request.query_params.get("dag-scope", "all")
                if scope not in ("all", "entity", "block"):
                    return _error(400, f"dag-scope must be all, entity or block, not {scope!r}")
                # Built whole, off the loop: a registry is at most 16 MiB, and a block that
                # turns out to be missing becomes a clean 404, not a cut stream.
                body = await trio.to_thread.run_sync(
                    lambda: car.write_car([cid], _car_blocks(blocks, proof, target, scope))
                )
                name = "_".join([cid, *names])
                return Response(body, media_type=CAR_TYPE, headers={
                    **headers, "Cache-Control": IMMUTABLE, "ETag": f'"{target}.car.{scope}"',
                    "X-Ipfs-Roots": ",".join([*proof, target]),
                    "Content-Disposition": f'attachment; filename="{name}.car"',
                })
            data = await trio.to_thread.run_sync(lambda: blocks.get_file("/".join([cid, *names])))
        except ContentNotFound as exc:
            return _error(404, str(exc))
        except ContentError as exc:
            return _error(400, str(exc))
        media = "application/json" if names and names[-1].endswith(".json") else "application/octet-stream"
        return Response(data, media_type=media, headers={**headers, "Cache-Control": IMMUTABLE, "ETag": f'"{target}"'})
