"""Audits: a sample of answers is re-checked on another worker that runs the same weights.

The user does not wait for it. After an answer is relayed, the gateway sends the prompt
and the claimed tokens to a different worker serving the same model *fingerprint*
(``/dllm/score/1.0.0``), which runs them through its copy of the model once and says,
for every claimed token, how plausible it was (``dllm_p2p.engine.scoring``). ``judge``
turns that into a verdict with tolerances measured on honest workers:

* greedy answers (temperature 0): every token must be the model's best, up to
  ``GREEDY_GAP`` nats of numerical noise (batching changes the last bits of a float);
* sampled answers: every token must be one the sampler could have drawn: inside
  ``top_k`` and the ``top_p`` nucleus when those were set, and above ``LOGPROB_FLOOR``
  at the request's temperature (more than ``MAX_IMPLAUSIBLE`` such tokens fail);
* always: the prompt length the worker claimed must be the auditor's, and the claimed
  tokens must be those the worker signed.

A failed verdict is confirmed by a second auditor when there is one (so one lying
auditor cannot frame an honest worker: if the second disagrees, the first is the one
suspected). A confirmed failure is kept as evidence (the signed request and answer and
both verdicts) and puts the worker in quarantine: never routed to until it passes
``PROBATION_PASSES`` probe audits in a row (one probe every ``PROBE_INTERVAL`` seconds).

What an audit cannot catch: workers that collude (a liar audited by its accomplice), a
liar that answers honestly whenever it might be audited (it cannot tell which answers
are, but it can answer honestly to everyone it suspects to be an auditor), and a wrong
answer made only of plausible tokens when sampling (a fluent answer to the wrong question
can pass a sampled audit after its first tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dllm_p2p import answers, wire
from dllm_p2p.client import Client, ClientError
from dllm_p2p.fsutil import write_json_atomic

from .nodes import NodeState, NodeTable

log = logging.getLogger("gateway.audit")

#: A greedy token may be this many nats below the best one (numerical noise of batching;
#: honest workers measured at most 1e-5 on tiny).
GREEDY_GAP = 0.1
#: A sampled token this unlikely (log-probability at the request's temperature) is
#: implausible; more than MAX_IMPLAUSIBLE of them fail the answer.
LOGPROB_FLOOR = -18.0
MAX_IMPLAUSIBLE = 1
#: Slack at the top-k and top-p boundaries (ties and float noise).
TOP_P_SLACK = 0.02
PROBE_INTERVAL = 30.0
PROBATION_PASSES = 3
PROBE_REQUEST = wire.Request(prompt="The capital of France is", max_new_tokens=8, temperature=0.0, return_tokens=True)
#: Audits waiting to run; past this, new ones are skipped (and counted), never queued.
QUEUE = 64
AUDIT_TIMEOUT = 60.0
EVIDENCE_KEPT = 100


@dataclass
class Verdict:
    passed: bool
    reason: str
    auditor: str = ""
    scores: dict[str, Any] | None = None


def judge(request: wire.Request, frame: dict[str, Any], scores: dict[str, Any]) -> Verdict:
    """The verdict on one answer (``frame``: the ``done`` frame with ``tokens``) from an
    auditor's ``scores`` of its tokens."""
    tokens = frame.get("tokens") or []
    usage = frame.get("usage", {})
    if scores["prompt_tokens"] != usage.get("prompt_tokens"):
        return Verdict(False, f"claimed {usage.get('prompt_tokens')} prompt tokens, the prompt has {scores['prompt_tokens']}")
    if len(tokens) != usage.get("completion_tokens"):
        return Verdict(False, f"claimed {usage.get('completion_tokens')} completion tokens, sent {len(tokens)}")
    for i in range(len(tokens)):
        where = f"token {i} ({tokens[i]})"
        if request.temperature == 0:
            if scores["gaps"][i] > GREEDY_GAP:
                return Verdict(False, f"{where} is not the model's choice: {scores['gaps'][i]:.2f} nats below the best (greedy)")
            continue
        if request.top_k and scores["ranks"][i] > request.top_k:
            return Verdict(False, f"{where} ranks {scores['ranks'][i]}, outside top_k {request.top_k}")
        if request.top_p < 1 and scores["mass_above"][i] > request.top_p + TOP_P_SLACK:
            return Verdict(False, f"{where} lies outside the top_p {request.top_p} nucleus")
    if request.temperature > 0:
        implausible = [i for i, lp in enumerate(scores["logprobs"]) if lp < LOGPROB_FLOOR]
        if len(implausible) > MAX_IMPLAUSIBLE:
            return Verdict(False, f"{len(implausible)} tokens are implausible (log-probability below {LOGPROB_FLOOR:g}), first at {implausible[0]}")
    return Verdict(True, f"{len(tokens)} tokens plausible")


@dataclass
class Job:
    request: wire.Request
    frame: dict[str, Any]
    node: str


class Auditor:
    """Samples answers, audits them in the background, quarantines liars, probes them."""

    def __init__(
        self,
        table: NodeTable,
        client: Client | None,
        *,
        rate: float,
        evidence_dir: Path | None = None,
        rng: random.Random | None = None,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"--audit-rate must be between 0 and 1, not {rate:g}")
        self.table = table
        self.client = client
        self.rate = rate
        self.evidence_dir = evidence_dir
        self.rng = rng or random.Random()
        self.probe_interval = probe_interval
        self._send, self._receive = trio.open_memory_channel[Job](QUEUE)
        self.evidence: deque[dict[str, Any]] = deque(maxlen=EVIDENCE_KEPT)
        self.counts = {"sampled": 0, "passed": 0, "failed": 0, "quarantined": 0, "skipped": 0, "unauditable": 0, "errors": 0, "disputed": 0, "probes": 0}

    # --- from the request path ---------------------------------------------------------

    def sample(self) -> bool:
        """Whether to audit the next answer (then ask the worker for its tokens)."""
        return self.client is not None and self.rate > 0 and self.rng.random() < self.rate

    def submit(self, request: wire.Request, frame: dict[str, Any], node: str) -> None:
        """Queue an answer for audit; never blocks (a full queue skips it)."""
        self.counts["sampled"] += 1
        try:
            self._send.send_nowait(Job(request, frame, node))
        except trio.WouldBlock:
            self.counts["skipped"] += 1

    # --- the background ----------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_loop)
            async for job in self._receive:
                with trio.move_on_after(AUDIT_TIMEOUT):
                    try:
                        await self.audit(job)
                    except Exception as exc:  # an audit must never take the gateway down
                        self.counts["errors"] += 1
                        log.warning("audit of %s failed to run: %r", job.node, exc)

    async def audit(self, job: Job) -> Verdict | None:
        """Audit one answer; None when no other worker could check it."""
        model = job.frame.get("model") or job.request.model
        fingerprint = job.frame.get("fingerprint")
        statement = job.frame.get("signature") or {}
        tokens = job.frame.get("tokens")
        if not isinstance(tokens, list) or statement.get("tokens") != answers.token_digest(tokens):
            return await self._convict(job, [Verdict(False, "the tokens sent are not the tokens signed")])
        if not tokens:
            return None
        auditors = self.table.auditors(model, fingerprint, exclude={job.node})
        if not auditors:
            self.counts["unauditable"] += 1
            return None
        first = self.rng.choice(auditors)
        verdict = await self._check(first, job)
        if verdict is None:
            return None
        if verdict.passed:
            self.counts["passed"] += 1
            self.table.record_audit(job.node, passed=True, reason=verdict.reason)
            return verdict
        others = [a for a in auditors if a.peer_id != first.peer_id]
        if others:
            second = await self._check(self.rng.choice(others), job)
            if second is not None and second.passed:
                # Two auditors disagree: the accused goes free, the first auditor is suspect.
                self.counts["disputed"] += 1
                self.table.record_failure(first.peer_id, f"audit verdict contradicted: {verdict.reason}", backoff=False)
                log.warning("auditors disagree about %s: %s says %s, %s says it is fine", job.node, first.peer_id, verdict.reason, second.auditor)
                return second
            return await self._convict(job, [verdict] + ([second] if second is not None else []))
        return await self._convict(job, [verdict])

    async def _check(self, auditor: NodeState, job: Job) -> Verdict | None:
        assert self.client is not None
        scoring = wire.ScoreRequest(
            dataclasses.replace(job.request, stream=False, keep_alive=False, return_tokens=False, id=None, model=job.frame.get("model")),
            tuple(job.frame["tokens"]),
        )
        for addr in auditor.addrs[:4]:
            try:
                scores = await self.client.score(addr, scoring)
            except ClientError as exc:
                log.debug("auditor %s could not score: %s", auditor.peer_id, exc)
                continue
            verdict = judge(job.request, job.frame, scores)
            verdict.auditor, verdict.scores = auditor.peer_id, scores
            return verdict
        self.counts["errors"] += 1
        return None

    async def _convict(self, job: Job, verdicts: list[Verdict]) -> Verdict:
        self.counts["failed"] += 1
        reason = verdicts[0].reason
        newly = self.table.quarantine(job.node, reason)
        if newly:
            self.counts["quarantined"] += 1
        log.warning("audit failed for %s: %s%s", job.node, reason, " (quarantined)" if newly else "")
        evidence = {
            "time": time.time(),
            "node": job.node,
            "request": job.request.to_wire(),
            "answer": {k: job.frame.get(k) for k in ("text", "model", "fingerprint", "finish_reason", "usage", "tokens", "signature")},
            "verdicts": [{"passed": v.passed, "reason": v.reason, "auditor": v.auditor, "scores": v.scores} for v in verdicts],
        }
        self.evidence.append(evidence)
        if self.evidence_dir is not None:
            try:
                await trio.to_thread.run_sync(self._save, evidence)
            except OSError as exc:
                log.warning("could not save audit evidence: %s", exc)
        return verdicts[0]

    def _save(self, evidence: dict[str, Any]) -> None:
        assert self.evidence_dir is not None
        name = f"{int(evidence['time'] * 1000)}-{evidence['node'][:16]}.json"
        write_json_atomic(self.evidence_dir / name, evidence)
        for old in sorted(self.evidence_dir.glob("*.json"))[:-EVIDENCE_KEPT]:
            old.unlink(missing_ok=True)

    async def _probe_loop(self) -> None:
        """A quarantined node is asked a probe question now and then; enough audited
        passes in a row and it is routed to again."""
        while True:
            await trio.sleep(self.probe_interval)
            for node in [n for n in self.table.nodes.values() if n.quarantined]:
                with trio.move_on_after(AUDIT_TIMEOUT):
                    try:
                        await self._probe(node)
                    except Exception as exc:
                        log.debug("probe of %s failed: %r", node.peer_id, exc)

    async def _probe(self, node: NodeState) -> None:
        assert self.client is not None
        model = node.models[0] if node.models else None
        request = dataclasses.replace(PROBE_REQUEST, model=model)
        for addr in node.addrs[:4]:
            try:
                frame = await self.client.complete(addr, request)
            except ClientError:
                continue
            self.counts["probes"] += 1
            verdict = await self.audit(Job(request, frame, node.peer_id))
            if verdict is not None and verdict.passed:
                self.table.probation_pass(node.peer_id, PROBATION_PASSES)
            return

    def describe(self) -> dict[str, Any]:
        return {"rate": self.rate, "counts": dict(self.counts), "evidence": list(self.evidence)[-20:]}
