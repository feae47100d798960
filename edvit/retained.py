"""Following the retained plan: the one place where `plan` and `models/*` become a runtime.

Every service that runs models (node, aggregator, camera head) hands a `PlanFollower` two
functions: which model files a plan asks of it (model id -> sha256) and how to load them
into sessions. The follower then

- subscribes to the plan and to exactly the model topics the newest plan needs,
  unsubscribing the ones no longer needed;
- checks every model file's sha256 (against itself and against the plan) and counts
  refusals; bytes that are sound but not what the current plan names are kept, since a
  deploy publishes the next plan's models before the plan itself;
- builds sessions on its own worker thread, never on the MQTT network thread, and swaps
  the (plan, runtime) pair atomically, so the service keeps serving the old plan while the
  new one loads, and a plan whose models cannot be loaded is refused while the old one
  keeps serving;
- reports every change through one callback, from which the service derives its status.

A plan whose model files are the same as the active plan's is switched to without loading
anything again, once the service's check says the loaded models fit it.

A follower never strands itself waiting for a file:

- it keeps the model files of the plans it served lately (by sha256, up to `keep_mb`), so a
  switch to a plan without its models and back again needs no fetch;
- while a file the newest plan needs has not arrived, it subscribes to that model topic
  again (the broker then sends its retained file again), after 10 s, then 20, 40, ... up
  to every 120 s, counting `model_refetches`; after `MISSING_REPORT_S` it names the missing
  files in `problem` (the service's status `error`) until they arrive. The old plan keeps
  serving meanwhile.

Given a trust key (`--trust-key`), the follower takes only plans that key signed
(edvit/signing.py): an unsigned or wrongly signed plan, or a cleared one (a clear cannot be
signed), is refused like a plan whose models cannot load: counted, logged once, named in
`refused`, and the old plan keeps serving. The plan pins every model file by sha256, so its
signature covers the models too. A signed plan older than the newest the follower took
(its sequence, edvit/replay.py, kept in a state file across restarts) is refused the same
way as a replay, counted in `plans_replayed`. A follower whose state file keeps a plan
starts from it (checked like any plan), so after a restart it serves the newest plan it
knew even while the broker holds a replayed one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from edvit.bundle import sha256_bytes
from edvit.errors import BadPayload, ConfigError, IntegrityError
from edvit.mqtt import Transport
from edvit.replay import PlanSequence
from edvit.schemas import ModelMsg, PlanMsg, decode
from edvit.service import Worker
from edvit.signing import PlanSignatureError, TrustKey
from edvit.topics import Topics

R = TypeVar("R")

# Model files kept from the plans served lately (sha256 -> bytes), by default.
KEEP_MB = 256.0
# A newest plan's missing model files: asked for again after REFETCH_FIRST_S, doubling up to
# REFETCH_MAX_S; named in `problem` once missing for MISSING_REPORT_S.
# A re-ask makes the broker send a retained file again even if a copy is on its way (a file
# of hundreds of MB on a slow link), so the first comes late and they thin out.
REFETCH_FIRST_S = 10.0
REFETCH_MAX_S = 120.0
MISSING_REPORT_S = 5.0

ModelIds = Callable[[PlanMsg], dict[str, str]]
"""Model id -> sha256 of every file this service needs from a plan; ConfigError refuses it."""

Loader = Callable[[PlanMsg, dict[str, bytes]], R]
"""Model files (by id) -> the service's runtime; ConfigError (or BadPayload) refuses the plan."""

Check = Callable[[PlanMsg, R], None]
"""Whether a runtime fits a plan (input size, feature widths, classes): ConfigError refuses
the plan. Run on every plan, also one that reuses the active plan's model files."""


@dataclass(frozen=True)
class Active(Generic[R]):
    """A plan and the runtime loaded for it: read both from the same object."""

    plan: PlanMsg
    runtime: R
    models: dict[str, str]  # model id -> sha256 the runtime was loaded from


class PlanFollower(Generic[R]):
    def __init__(
        self,
        client: Transport,
        topics: Topics,
        model_ids: ModelIds,
        load: Loader[R],
        *,
        check: Check[R] | None = None,
        on_update: Callable[[], None] | None = None,
        logger: logging.Logger | None = None,
        trust_key: TrustKey | None = None,
        sequence: PlanSequence | None = None,
        keep_mb: float = KEEP_MB,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.topics = topics
        self.counters = client.counters
        self.log = logger or logging.getLogger("edvit.retained")
        self._model_ids = model_ids
        self._load = load
        self._check = check or (lambda _plan, _runtime: None)
        self._on_update = on_update or (lambda: None)
        self._trust = trust_key
        # The newest signed plan taken; kept in memory only unless the service gives one
        # with a state file.
        self.sequence = sequence or PlanSequence(logger=self.log)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._target: PlanMsg | None = None  # the newest plan accepted
        self._wanted: dict[str, str] = {}  # what the target needs: model id -> sha256
        # Model id -> sound files by sha256: the one the target names (when here) and the
        # newest other one, so that a stray sound file cannot evict the plan's own.
        self._blobs: dict[str, dict[str, bytes]] = {}
        self._active: Active[R] | None = None
        self._refused: str | None = None
        self._failed: tuple[str, dict[str, str]] | None = None  # (plan id, models) that failed
        # Files of the plans served lately, newest last, and their budget.
        self._kept: OrderedDict[str, bytes] = OrderedDict()
        self._keep_bytes = int(keep_mb * 1_000_000)
        self._clock = clock
        self._missing_since: float | None = None  # when the target started waiting for files
        self._next_refetch = 0.0
        self._refetch_delay = REFETCH_FIRST_S
        self._waiting: str | None = None  # which files the target lacks, once reported
        self._worker = Worker("loader", self._wait_and_step, self.counters, self.log)

    # -- what the service reads ------------------------------------------------------------
    @property
    def active(self) -> Active[R] | None:
        return self._active

    @property
    def target(self) -> PlanMsg | None:
        return self._target

    @property
    def refused(self) -> str | None:
        """Why the newest plan was refused (None when it was not)."""
        return self._refused

    @property
    def problem(self) -> str | None:
        """What a service's status names as its error: why the newest plan was refused, or
        which of its model files have not arrived."""
        return self._refused or self._waiting

    def missing(self) -> dict[str, str]:
        """The target's model files that are not here: model id -> sha256."""
        with self._lock:
            return {mid: sha for mid, sha in self._wanted.items()
                    if sha not in self._blobs.get(mid, {})}  # fmt: skip

    @property
    def ready(self) -> bool:
        """The newest plan is the one being served."""
        active, target = self._active, self._target
        return active is not None and target is not None and active.plan is target

    def received(self) -> set[str]:
        """The target's model ids whose files are here and match the plan."""
        with self._lock:
            return {mid for mid, sha in self._wanted.items() if sha in self._blobs.get(mid, {})}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        kept = self.sequence.newest_plan if self._trust is not None else None
        if kept is not None:
            self.log.info("starting from the newest plan followed before the restart")
            try:
                self._on_plan(self.topics.plan(), kept)
            except BadPayload as exc:
                self.log.warning("the kept plan does not decode (%s); waiting for the broker's",
                                 exc)  # fmt: skip
        self.client.route(self.topics.plan(), self._on_plan, qos=1)
        self._worker.start()

    def stop(self) -> None:
        self._worker.stopping.set()
        self._wake.set()
        self._worker.stop()

    # -- network thread: decode, verify, remember; never load ----------------------------------
    def _on_plan(self, _topic: str, payload: bytes) -> None:
        plan = decode(PlanMsg, payload)
        if self._trust is not None:
            reason = "unsigned (a clear cannot be signed)" if plan is None else None
            if plan is not None:
                try:
                    self._trust.verify(plan)
                except PlanSignatureError as exc:
                    reason = str(exc)
            if reason is not None:
                self.counters["plan_signatures_refused"] += 1
                self._refuse(plan.plan_id if plan else "(cleared)", reason)
                return
            replayed = self.sequence.replayed(plan) if plan is not None else None
            if plan is not None and replayed is not None:
                self.counters["plans_replayed"] += 1
                self._refuse(plan.plan_id, replayed)
                return
        wanted: dict[str, str] = {}
        if plan is not None:
            try:
                wanted = self._model_ids(plan)
            except ConfigError as exc:
                self._refuse(plan.plan_id, str(exc))
                return
            if self._trust is not None:
                self.sequence.advance(plan)
        with self._lock:
            target = self._target
            same = plan is not None and target is not None and plan.plan_id == target.plan_id
            # A plan refused on arrival came between: the newest plan is the target again.
            failed = (
                self._failed is not None
                and target is not None
                and (self._failed[0] == target.plan_id)
            )
            cleared = same and self._refused is not None and not failed
            if cleared:
                self._refused = None
            elif not same:
                before = set(self._wanted)
                self._target, self._wanted, self._refused = plan, wanted, None
                self._blobs = {mid: shas for mid, shas in self._blobs.items() if mid in wanted}
                for mid, sha in wanted.items():  # files of a plan served lately need no fetch
                    if sha in self._kept and sha not in self._blobs.get(mid, {}):
                        self._blobs.setdefault(mid, {})[sha] = self._kept[sha]
                        self.counters["models_from_kept"] += 1
                self._missing_since = None
                self._refetch_delay = REFETCH_FIRST_S
                self._waiting = None
                # Needed and subscribed, but its file is not here: subscribe again, and the
                # broker sends the retained file again.
                refetch = [m for m in set(wanted) & before
                           if wanted[m] not in self._blobs.get(m, {})]  # fmt: skip
        if same:  # the same retained plan again (a reconnect)
            if cleared:
                self._on_update()
            return
        for model_id in sorted(before - set(wanted)):
            self.client.unroute(self.topics.model(model_id))
        for model_id in sorted(refetch):
            self.client.unroute(self.topics.model(model_id))
        for model_id in sorted((set(wanted) - before) | set(refetch)):
            self.client.route(self.topics.model(model_id), self._on_model, qos=1)
        if plan is None:
            self.log.info("plan cleared")
        else:
            self.log.info("plan %s needs %d model files here", plan.plan_id, len(wanted))
        self._wake.set()
        self._on_update()

    def _on_model(self, topic: str, payload: bytes) -> None:
        model_id = self.topics.parts(topic)[1]
        msg = decode(ModelMsg, payload)
        if msg is None:
            return  # cleared; the plan decides what is served
        actual = sha256_bytes(msg.onnx)
        with self._lock:
            expected = self._wanted.get(model_id)
        if expected is None:
            return  # no longer needed
        if actual != msg.sha256:
            self.counters["models_refused"] += 1
            raise IntegrityError(
                f"refusing model {model_id}: its bytes hash to {actual[:12]}…, "
                f"the message says {msg.sha256[:12]}…"
            )
        with self._lock:
            if model_id not in self._wanted:
                return
            kept = {actual, self._wanted[model_id]}
            shas = {**self._blobs.get(model_id, {}), actual: msg.onnx}
            self._blobs[model_id] = {sha: blob for sha, blob in shas.items() if sha in kept}
        if actual != expected:
            # Sound bytes, but not the current plan's: a deploy publishes the next plan's
            # models before the plan, so keep them.
            self.counters["models_for_other_plan"] += 1
            self.log.info("model %s (sha256 %s…) is not the plan's; kept", model_id, actual[:12])
            return
        self.log.info("received model %s (sha256 %s…)", model_id, actual[:12])
        self._wake.set()
        self._on_update()

    def _keep(self, blobs: dict[str, bytes], wanted: dict[str, str]) -> None:
        """Remember the served plan's files (newest last), dropping the oldest others beyond
        the budget; the served plan's own are never dropped."""
        for mid, sha in wanted.items():
            self._kept[sha] = blobs[mid]
            self._kept.move_to_end(sha)
        serving = set(wanted.values())
        total = sum(len(blob) for blob in self._kept.values())
        for sha in list(self._kept):
            if total <= self._keep_bytes:
                break
            if sha not in serving:
                total -= len(self._kept.pop(sha))

    def _refuse(self, plan_id: str, reason: str) -> None:
        self.counters["plans_refused"] += 1
        self._refused = f"plan {plan_id}: {reason}"
        self.log.warning("refused plan %s: %s; still serving %s", plan_id, reason,
                       self._active.plan.plan_id if self._active else "nothing")  # fmt: skip
        self._on_update()

    # -- worker thread: load, then swap ---------------------------------------------------------
    def _wait_and_step(self) -> None:
        if self._wake.wait(1.0) and not self._worker.stopping.is_set():
            self._wake.clear()
            self._step()
        if not self._worker.stopping.is_set():
            self._chase_missing()

    def _chase_missing(self) -> None:
        """Subscribe again to the model files the newest plan still lacks, with backoff, and
        say which they are once they have been missing for MISSING_REPORT_S."""
        missing = self.missing()
        now = self._clock()
        if not missing:
            if self._waiting is not None:
                self._waiting = None
                self._on_update()
            self._missing_since = None
            return
        if self._missing_since is None:
            self._missing_since, self._next_refetch = now, now + self._refetch_delay
            return
        waited = now - self._missing_since
        target_id = self._target.plan_id if self._target else "?"
        if now >= self._next_refetch:
            self.counters["model_refetches"] += 1
            for model_id in sorted(missing):
                self.client.unroute(self.topics.model(model_id))
                self.client.route(self.topics.model(model_id), self._on_model, qos=1)
            self._refetch_delay = min(self._refetch_delay * 2, REFETCH_MAX_S)
            self._next_refetch = now + self._refetch_delay
            self.log.warning(
                "plan %s: model files %s not received in %.0f s; asked the broker again "
                "(next in %.0f s) [model_refetches=%d]",
                target_id, ", ".join(sorted(missing)), waited, self._refetch_delay,
                self.counters["model_refetches"],
            )  # fmt: skip
        waiting = (
            f"plan {target_id}: waiting for model files {', '.join(sorted(missing))} (not on "
            f"the broker, asked {self.counters['model_refetches']} times)"
        )
        if waited >= MISSING_REPORT_S and waiting != self._waiting:
            self._waiting = waiting
            self._on_update()

    def _step(self) -> None:
        with self._lock:
            target, wanted = self._target, dict(self._wanted)
            blobs = {mid: self._blobs[mid][sha] for mid, sha in wanted.items()
                     if sha in self._blobs.get(mid, {})}  # fmt: skip
        active = self._active
        if target is None:
            if active is not None:
                self._active = None
                self._on_update()
            return
        if active is not None and active.plan is target:
            return
        if len(blobs) < len(wanted):
            return  # still waiting for model files
        if self._failed == (target.plan_id, wanted):
            return
        try:
            if active is not None and active.models == wanted:
                runtime = active.runtime  # same files: switch the plan, keep the sessions
            else:
                runtime = self._load(target, blobs)
            self._check(target, runtime)
        except (ConfigError, BadPayload) as exc:
            self._failed = (target.plan_id, wanted)
            self._refuse(target.plan_id, str(exc))
            return
        with self._lock:
            if self._target is not target:
                self._wake.set()  # a newer plan arrived while loading
                return
            self._active = Active(target, runtime, wanted)
            self._keep(blobs, wanted)
        self.log.info("serving plan %s", target.plan_id)
        self._on_update()
