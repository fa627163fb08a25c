"""The CID relay: after each registry publication, push the new CID to sinks the operator
names with ``--publish-to SINK`` (repeatable).

Sinks:

* ``git+file:///abs/path``, ``git+ssh://...``, ``git+https://...`` (``git+http://``):
  a git repository. The node keeps its own bare clone in
  ``<data-dir>/sinks/git-<sha256 of the URL, 16 hex>``, and for each new CID commits
  ``current_cid.txt`` (the CID and a newline; the other files of the branch are kept)
  as ``registry <CID>``, author ``dllm-p2p <peer id>``, on top of the remote's default
  branch, and pushes it. No commit when the branch already holds that CID. Runs the
  ``git`` command (in a thread, each call with a timeout, ``GIT_TERMINAL_PROMPT=0``,
  identity and signing set per command, so the user's git config is not needed).
* ``https://...`` or ``http://...``: a webhook. POSTs the JSON document
  ``{"cid", "peer_id", "time", "head", "public_key", "signature"}``: ``signature`` is
  the node key's Ed25519 signature (base64) over ``b"dllm-cid/1\\n"`` followed by the
  canonical JSON (sorted keys, no whitespace, ASCII) of every other field, and
  ``public_key`` is the node's libp2p public key (base64), from which ``peer_id`` derives
  (:func:`verify_document` checks both). Any 2xx is success.
* ``dnslink:/abs/path/zone-file[?name=example.org]``: a zone file, rewritten atomically
  with the line ``_dnslink 60 IN TXT "dnslink=/ipfs/<CID>"`` (the record at the zone's
  origin), or with ``?name=example.org`` the absolute ``_dnslink.example.org. 60 IN TXT
  ...``. Other lines of the file are kept, so it can be the zone itself or a file the
  zone ``$INCLUDE``s.

Each sink has its own background task that delivers the latest CID only: a newer CID
supersedes one still pending or being retried. A failed try is retried after 1, 2, 4 ...
up to 60 s, at most ``tries`` times; failures are logged and counted in
:attr:`Sinks.status`, never raised. ``Sinks.published(cid)`` never blocks.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from ..fsutil import write_atomic
from .chain import canonical

log = logging.getLogger("dllm_p2p.registry.sinks")

#: Prepended to the canonical JSON of a webhook document before signing.
CID_DOMAIN = b"dllm-cid/1\n"
#: The file a git sink commits.
GIT_FILE = "current_cid.txt"
#: Seconds one git command or one webhook request may take.
TIMEOUT = 60.0
WEBHOOK_TIMEOUT = 10.0
#: Tries per CID, and the pause before the first retry (doubling up to MAX_DELAY).
TRIES = 8
FIRST_DELAY = 1.0
MAX_DELAY = 60.0
#: TTL of the DNSLink TXT record, in seconds.
DNSLINK_TTL = 60

SINK_FORMS = (
    "git+file:///PATH, git+ssh://HOST/PATH, git+https://HOST/PATH (a git repository), "
    "https://URL or http://URL (a webhook), dnslink:/PATH/ZONE-FILE[?name=DOMAIN]"
)
_GIT_SCHEMES = ("file", "ssh", "https", "http")
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class SinkSpecError(ValueError):
    """A ``--publish-to`` value that names no sink we know how to use."""


class SinkError(Exception):
    """One try of a sink failed (it is retried)."""


class PermanentSinkError(SinkError):
    """A sink cannot deliver this CID however often it tries (no retry)."""


@dataclass(frozen=True)
class SinkSpec:
    """A parsed ``--publish-to`` value. ``spec`` is the text as given (the status key)."""

    kind: str  # "git", "webhook" or "dnslink"
    spec: str
    #: git: the URL handed to git; webhook: the URL; dnslink: the zone file's path.
    target: str
    #: dnslink: the domain of ``?name=`` (no trailing dot), else None.
    name: str | None = None


def parse_sink(text: str) -> SinkSpec:
    """Parse one ``--publish-to`` value; raise ``SinkSpecError`` saying what is wrong."""
    spec = text.strip()
    if not spec:
        raise SinkSpecError(f"no sink given: use {SINK_FORMS}")
    lower = spec.lower()
    if lower.startswith("git+"):
        url = spec[4:]
        parts = urlsplit(url)
        if parts.scheme.lower() not in _GIT_SCHEMES:
            raise SinkSpecError(f"{spec!r}: a git sink is git+file:///PATH, git+ssh://, git+https:// or git+http://")
        if parts.scheme.lower() == "file":
            if parts.netloc or not parts.path.startswith("/"):
                raise SinkSpecError(f"{spec!r}: give an absolute path, with three slashes: git+file:///path/to/repo.git")
        elif not parts.netloc:
            raise SinkSpecError(f"{spec!r}: no host in the git URL")
        if parts.path.rstrip("/") in ("", "/") and parts.scheme.lower() == "file":
            raise SinkSpecError(f"{spec!r}: no repository path")
        return SinkSpec("git", spec, url)
    if lower.startswith(("https://", "http://")):
        parts = urlsplit(spec)
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if not parts.hostname or not port_ok:
            raise SinkSpecError(f"{spec!r}: a webhook needs a URL with a host (and a valid port)")
        return SinkSpec("webhook", spec, spec)
    if lower.startswith("dnslink:"):
        rest = spec[len("dnslink:"):]
        path, _, query = rest.partition("?")
        if path.startswith("//"):
            path = "/" + path.lstrip("/")  # dnslink:///abs/zone means the same file
        if not path.startswith("/") or path.endswith("/"):
            raise SinkSpecError(f"{spec!r}: a DNSLink sink is dnslink:/absolute/path/to/zone-file[?name=DOMAIN]")
        name = None
        if query:
            try:
                fields = parse_qs(query, keep_blank_values=True, strict_parsing=True)
            except ValueError:
                fields = {}
            if set(fields) != {"name"} or len(fields["name"]) != 1:
                raise SinkSpecError(f"{spec!r}: the only option of a DNSLink sink is ?name=DOMAIN")
            name = fields["name"][0].strip().rstrip(".").lower()
            labels = name.split(".")
            if not name or len(name) > 240 or not all(_LABEL.match(label) for label in labels):
                raise SinkSpecError(f"{spec!r}: {fields['name'][0]!r} is not a domain name")
        return SinkSpec("dnslink", spec, unquote(path), name)
    if lower.startswith("file:") or lower.startswith("/"):
        raise SinkSpecError(f"{spec!r}: to push to a git repository write git+file:///PATH; to write a zone file, dnslink:/PATH")
    raise SinkSpecError(f"{spec!r}: unknown sink; use {SINK_FORMS}")


def parse_sinks(texts: list[str] | None) -> list[SinkSpec]:
    """Parse every value, dropping repeats (the first spelling wins)."""
    specs: dict[str, SinkSpec] = {}
    for text in texts or []:
        spec = text if isinstance(text, SinkSpec) else parse_sink(text)
        specs.setdefault(spec.spec, spec)
    return list(specs.values())


def sink_argument(text: str) -> SinkSpec:
    """``type=`` of the ``--publish-to`` option: argparse exits 2 with the message."""
    try:
        return parse_sink(text)
    except SinkSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PUBLISH_TO_HELP = (
    "after each registry publication push the new CID to SINK (repeatable): git+file:///PATH, git+ssh://, "
    "git+https:// (commit current_cid.txt to the repository's default branch), https://URL (POST a signed JSON "
    "document) or dnslink:/PATH/ZONE-FILE[?name=DOMAIN] (write a DNSLink TXT record); see docs/REGISTRY.md"
)


# --- the sinks, together ------------------------------------------------------------------


@dataclass(frozen=True)
class Publication:
    cid: str
    head: str | None
    at: int  # unix seconds


class Sinks:
    """The operator's sinks, each fed the latest CID by ``published`` and served by its own
    task under ``run``. ``status`` maps each sink (as given) to ``pushed`` (deliveries),
    ``failed`` (failed tries), ``last_cid`` (the CID it last confirmed holding),
    ``last_error`` and ``last_ok`` (unix time)."""

    def __init__(
        self,
        specs: list[str | SinkSpec],
        identity: Any,
        data_dir: str | Path,
        *,
        tries: int = TRIES,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        timeout: float | None = None,
        git: str = "git",
    ) -> None:
        self.identity = identity
        self.data_dir = Path(data_dir).expanduser()
        self.status: dict[str, dict[str, Any]] = {}
        self.sinks: list[Sink] = []
        for spec in parse_sinks(specs):  # type: ignore[arg-type]
            status = self.status[spec.spec] = {"pushed": 0, "failed": 0, "last_cid": None, "last_error": None, "last_ok": None}
            options = dict(status=status, tries=max(1, tries), first_delay=first_delay, max_delay=max_delay)
            sink: Sink
            if spec.kind == "git":
                sink = GitSink(spec, identity, self.data_dir, git=git, timeout=timeout or TIMEOUT, **options)  # type: ignore[arg-type]
            elif spec.kind == "webhook":
                sink = WebhookSink(spec, identity, timeout=timeout or WEBHOOK_TIMEOUT, **options)  # type: ignore[arg-type]
            else:
                sink = DnslinkSink(spec, **options)  # type: ignore[arg-type]
            self.sinks.append(sink)

    def published(self, cid: str, head: str | None = None) -> None:
        """Hand ``cid`` (and the registry head it holds) to every sink; returns at once."""
        publication = Publication(cid, head, int(time.time()))
        for sink in self.sinks:
            sink.offer(publication)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled: one task per sink. Never raises a sink's failure."""
        async with trio.open_nursery() as nursery:
            for sink in self.sinks:
                nursery.start_soon(sink.loop)
            task_status.started()


def make_sinks(specs: list[Any] | None, identity: Any, data_dir: str | Path) -> Sinks | None:
    """The ``Sinks`` of ``--publish-to`` values, or None when there are none."""
    return Sinks(specs, identity, data_dir) if specs else None


# --- one sink -------------------------------------------------------------------------------


class Sink:
    """Delivers the latest publication it was offered, retrying with backoff; a newer one
    supersedes it. Subclasses implement ``push`` (True: delivered; False: the sink
    already held that CID)."""

    def __init__(self, spec: SinkSpec, *, status: dict[str, Any], tries: int, first_delay: float, max_delay: float) -> None:
        self.spec = spec
        self.status = status
        self.tries = tries
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._pending: Publication | None = None
        self._wake = trio.Event()
        #: The CID this sink confirmed holding last: offered again, it is not pushed again.
        self._delivered: str | None = None
        self._logged: str | None = None  # the permanent error logged last

    def offer(self, publication: Publication) -> None:
        self._pending = publication
        self._wake.set()

    async def push(self, publication: Publication) -> bool:
        raise NotImplementedError

    async def loop(self) -> None:
        while True:
            if self._pending is None:
                await self._wake.wait()
            self._wake = trio.Event()
            publication, self._pending = self._pending, None
            if publication is None or publication.cid == self._delivered:
                continue
            await self.deliver(publication)

    async def deliver(self, publication: Publication) -> None:
        """Push ``publication``, retrying; returns when it is delivered, given up, or
        superseded by a newer offer (which is then left pending for ``loop``)."""
        delay = self.first_delay
        for attempt in range(1, self.tries + 1):
            try:
                delivered = await self.push(publication)
            except PermanentSinkError as exc:
                self._failed(exc)
                if str(exc) != self._logged:
                    self._logged = str(exc)
                    log.error("CID sink %s: %s", self.spec.spec, exc)
                return
            except Exception as exc:
                self._failed(exc)
                if attempt == self.tries:
                    log.warning("CID sink %s: giving up on %s after %d tries: %s", self.spec.spec, publication.cid, attempt, self.status["last_error"])
                    return
                log.log(
                    logging.WARNING if attempt == 1 else logging.DEBUG,
                    "CID sink %s: pushing %s failed (try %d of %d, again in %g s): %s",
                    self.spec.spec, publication.cid, attempt, self.tries, delay, self.status["last_error"],
                )
                with trio.move_on_after(delay):
                    await self._wake.wait()
                if self._pending is not None:
                    log.debug("CID sink %s: %s superseded by %s", self.spec.spec, publication.cid, self._pending.cid)
                    return
                delay = min(2 * delay, self.max_delay)
                continue
            self._delivered = publication.cid
            self.status.update(last_cid=publication.cid, last_ok=time.time())
            if delivered:
                self.status["pushed"] += 1
                log.info("CID sink %s: pushed %s", self.spec.spec, publication.cid)
            return

    def _failed(self, exc: BaseException) -> None:
        self.status["failed"] += 1
        self.status["last_error"] = (str(exc) or repr(exc))[:500]


# --- git ----------------------------------------------------------------------------------


#: Variables that would point git at another repository or override our author.
_GIT_ENV_DROP = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE", "GIT_COMMON_DIR", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_AUTHOR_DATE",
    "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "GIT_COMMITTER_DATE",
)


class GitSink(Sink):
    def __init__(self, spec: SinkSpec, identity: Any, data_dir: Path, *, git: str = "git", timeout: float = TIMEOUT, **options: Any) -> None:
        super().__init__(spec, **options)
        self.url = spec.target
        self.peer_id = identity.peer_id.to_base58()
        self.git = git
        self.timeout = timeout
        self.clone = data_dir / "sinks" / f"git-{hashlib.sha256(self.url.encode()).hexdigest()[:16]}"

    async def push(self, publication: Publication) -> bool:
        # abandon_on_cancel: a node shutting down does not wait for a slow push (the git
        # process finishes or times out on its own).
        return await trio.to_thread.run_sync(self.push_sync, publication.cid, abandon_on_cancel=True)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}
        env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", LANGUAGE="C")
        return env

    def _run(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Run ``git args`` (in our clone unless ``cwd``); its stdout, or ``SinkError``."""
        command = [
            self.git, "-c", "user.name=dllm-p2p", "-c", f"user.email={self.peer_id}",
            "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", *args,
        ]
        try:
            done = subprocess.run(
                command, cwd=cwd or self.clone, input=input, capture_output=True, timeout=self.timeout,
                env=env or self._env(), stdin=None if input is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise PermanentSinkError(f"git is not installed (no {self.git!r} on PATH): cannot push the CID to {self.url}") from None
        except subprocess.TimeoutExpired:
            raise SinkError(f"git {args[0]} took more than {self.timeout:g} s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
            raise SinkError(f"git {args[0]} failed ({done.returncode}): {' / '.join(lines[-3:])[:300] or 'no message'}")
        return done.stdout.decode(errors="replace").strip()

    def _ensure_clone(self) -> None:
        if (self.clone / "HEAD").is_file():
            return
        if shutil.which(self.git) is None:
            raise PermanentSinkError(f"git is not installed (no {self.git!r} on PATH): cannot push the CID to {self.url}")
        self.clone.parent.mkdir(parents=True, exist_ok=True)
        if self.clone.exists():
            shutil.rmtree(self.clone)  # a clone that never completed
        partial = Path(tempfile.mkdtemp(dir=self.clone.parent, prefix=f".{self.clone.name}."))
        try:
            # Bare: we never need a work tree. Cloning (rather than init) also learns the
            # default branch of an empty remote (git 2.31+).
            self._run("clone", "--bare", "--quiet", self.url, str(partial / "repo"), cwd=self.clone.parent)
            os.replace(partial / "repo", self.clone)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _branch(self) -> tuple[str, str | None]:
        """The remote's default branch and its tip (None when it has no commit yet)."""
        branch = tip = None
        for line in self._run("ls-remote", "--symref", "origin", "HEAD").splitlines():
            first, _, ref = line.partition("\t")
            if first.startswith("ref: refs/heads/") and ref == "HEAD":
                branch = first[len("ref: refs/heads/"):]
            elif ref == "HEAD":
                tip = first
        if branch is None:  # an empty remote: what the clone learned, else git's default
            try:
                branch = self._run("symbolic-ref", "--short", "HEAD") or "main"
            except SinkError:
                branch = "main"
            found = self._run("ls-remote", "origin", f"refs/heads/{branch}").split()
            tip = found[0] if found else None
        return branch, tip

    def push_sync(self, cid: str) -> bool:
        """Commit and push ``cid``; False when the remote's branch already holds it."""
        self._ensure_clone()
        branch, tip = self._branch()
        if tip is not None:
            self._run("fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
        blob = self._run("hash-object", "-w", "--stdin", input=f"{cid}\n".encode())
        if tip is not None:
            try:
                if self._run("rev-parse", "--verify", "--quiet", f"{tip}:{GIT_FILE}") == blob:
                    self._run("update-ref", f"refs/heads/{branch}", tip)
                    return False
            except SinkError:
                pass  # no such file on the branch yet
        index = self.clone / f"dllm-index-{os.getpid()}-{time.monotonic_ns()}"
        env = {**self._env(), "GIT_INDEX_FILE": str(index)}
        try:
            if tip is not None:
                self._run("read-tree", tip, env=env)
            else:
                self._run("read-tree", "--empty", env=env)
            self._run("update-index", "--add", "--cacheinfo", f"100644,{blob},{GIT_FILE}", env=env)
            tree = self._run("write-tree", env=env)
        finally:
            index.unlink(missing_ok=True)
        parents = ["-p", tip] if tip is not None else []
        commit = self._run("commit-tree", tree, *parents, "-m", f"registry {cid}")
        self._run("push", "--quiet", "origin", f"{commit}:refs/heads/{branch}")
        self._run("update-ref", f"refs/heads/{branch}", commit)
        return True


# --- webhook ----------------------------------------------------------------------------


def signed_document(identity: Any, cid: str, *, at: int | None = None, head: str | None = None) -> dict[str, Any]:
    """The webhook's JSON document for ``cid``, signed by ``identity``."""
    doc: dict[str, Any] = {
        "cid": cid,
        "peer_id": identity.peer_id.to_base58(),
        "time": int(time.time()) if at is None else at,
        "public_key": base64.b64encode(identity.public_key_bytes).decode(),
    }
    if head is not None:
        doc["head"] = head
    doc["signature"] = base64.b64encode(identity.sign(CID_DOMAIN + canonical(doc))).decode()
    return doc


def verify_document(doc: Any) -> bool:
    """What a receiver checks: the signature verifies with ``public_key``, and ``peer_id``
    is that key's peer id."""
    from ..identity import peer_id_for, verify

    try:
        key = base64.b64decode(doc["public_key"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
        body = {k: v for k, v in doc.items() if k != "signature"}
        return peer_id_for(key) == doc["peer_id"] and verify(key, CID_DOMAIN + canonical(body), signature)
    except Exception:
        return False


class WebhookSink(Sink):
    def __init__(self, spec: SinkSpec, identity: Any, *, timeout: float = WEBHOOK_TIMEOUT, **options: Any) -> None:
        super().__init__(spec, **options)
        self.identity = identity
        self.url = spec.target
        self.timeout = timeout
        self._client: Any = None  # one httpx.AsyncClient while ``loop`` runs

    def _new_client(self) -> Any:
        import httpx

        return httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)

    async def loop(self) -> None:
        try:
            async with self._new_client() as self._client:
                await super().loop()
        finally:
            self._client = None

    async def push(self, publication: Publication) -> bool:
        import httpx

        doc = signed_document(self.identity, publication.cid, at=publication.at, head=publication.head)
        try:
            if self._client is not None:
                response = await self._client.post(self.url, json=doc)
            else:
                async with self._new_client() as client:
                    response = await client.post(self.url, json=doc)
        except httpx.HTTPError as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        if 200 <= response.status_code < 300:
            return True
        message = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        if response.status_code in (408, 425, 429) or response.status_code >= 500:
            raise SinkError(message)
        raise PermanentSinkError(f"the webhook refused {publication.cid}: {message}")


# --- DNSLink --------------------------------------------------------------------------------


class DnslinkSink(Sink):
    def __init__(self, spec: SinkSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        self.path = Path(spec.target)
        self.owner = f"_dnslink.{spec.name}." if spec.name else "_dnslink"

    def line(self, cid: str) -> str:
        return f'{self.owner} {DNSLINK_TTL} IN TXT "dnslink=/ipfs/{cid}"'

    async def push(self, publication: Publication) -> bool:
        return await trio.to_thread.run_sync(self.push_sync, publication.cid)

    def push_sync(self, cid: str) -> bool:
        """Put our record's line where it was (dropping repeats of it), else at the end;
        every other line is kept. False when the file already says this."""
        try:
            old = self.path.read_text()
            mode = self.path.stat().st_mode & 0o7777
        except (FileNotFoundError, NotADirectoryError):  # no such file (yet)
            old, mode = "", 0o644
        except (OSError, UnicodeDecodeError) as exc:
            raise SinkError(f"cannot read {self.path}: {exc}") from None
        lines: list[str] = []
        placed = False
        for line in old.splitlines():
            if (line.split() or [""])[0].lower() == self.owner.lower():
                if not placed:
                    lines.append(self.line(cid))
                    placed = True
            else:
                lines.append(line)
        if not placed:
            lines.append(self.line(cid))
        new = "\n".join(lines) + "\n"
        if new == old:
            return False
        try:
            write_atomic(self.path, new.encode(), mode=mode)
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc}") from None
        return True
