"""One active instance among several: a lease held through a retained message.

The holder republishes `{holder, ttl_s, ts}` on the lease topic every `renew_s`. Another
instance takes the lease when it has heard no renewal for `ttl_s` (times are this
process's own receive times, so clocks need not agree), or at once when the topic is
cleared (the holder stopped cleanly). Two instances that claim together both see the
other's claim; the one with the smaller id keeps the lease.

MQTT alone cannot make this exact: a holder cut off from the broker keeps believing it
holds the lease until it hears another claim, so for up to `ttl_s` after a network cut two
instances may both act. The aggregator copes: its answers are keyed by frame, and a
standby only answers frames it has not seen answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from edvit.errors import BadPayload
from edvit.mqtt import Transport
from edvit.service import Worker

DEFAULT_TTL_S = 3.0
DEFAULT_RENEW_S = 1.0
# On start, wait this long for a retained lease before claiming one nobody holds.
STARTUP_GRACE_S = 0.5


class LeaseMsg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    holder: str = Field(min_length=1)
    ttl_s: float = Field(gt=0, allow_inf_nan=False)
    ts: float = Field(default_factory=time.time, allow_inf_nan=False)


class Lease:
    def __init__(
        self,
        client: Transport,
        topic: str,
        instance: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        renew_s: float = DEFAULT_RENEW_S,
        on_change: Callable[[bool], None] | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.topic, self.instance = client, topic, instance
        self.ttl_s, self.renew_s = ttl_s, renew_s
        self.log = logger or logging.getLogger("edvit.lease")
        self._on_change = on_change or (lambda _held: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._held = False
        self._other: str | None = None  # the other holder heard last
        self._other_heard = clock()  # when: a retained lease gets a full ttl from our start
        self._started = clock()
        self._renewed = 0.0
        self._worker = Worker(
            "lease", self.tick, client.counters, self.log, interval_s=min(0.1, renew_s / 4)
        )

    @property
    def held(self) -> bool:
        return self._held

    @property
    def holder(self) -> str | None:
        return self.instance if self._held else self._other

    def start(self) -> None:
        self.client.route(self.topic, self._on_lease, qos=1)
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()
        if self._held:  # hand over at once instead of after the ttl
            self.client.publish(self.topic, b"", qos=1, retain=True)
            self._set(False)

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        if not payload:
            with self._lock:
                self._other = None
            return
        try:
            lease = LeaseMsg.model_validate_json(payload)
        except ValueError:
            raise BadPayload("lease: not a valid lease message") from None
        if lease.holder == self.instance:
            return  # our own renewal
        with self._lock:
            self._other, self._other_heard = lease.holder, self._clock()
            yield_to_other = self._held and lease.holder < self.instance
        if yield_to_other:
            self.log.warning("%s also claims the lease; it keeps it", lease.holder)
            self._set(False)
        elif self._held:
            self._renew()  # tell the other claimant at once

    def tick(self) -> None:
        """One step of the protocol (the thread calls it; tests may call it directly)."""
        now = self._clock()
        if self._held:
            if now - self._renewed >= self.renew_s:
                self._renew()
            return
        with self._lock:
            other, heard = self._other, self._other_heard
        # Nobody holds it: claim after the start-up grace. Somebody did: after their ttl.
        free = (
            (now - self._started >= STARTUP_GRACE_S)
            if other is None
            else (now - heard > self.ttl_s)
        )
        if free:
            if other is not None:
                self.log.warning("no renewal from %s for %.1f s; taking over", other, now - heard)
            self._renew()
            self._set(True)

    def _renew(self) -> None:
        self._renewed = self._clock()
        message = LeaseMsg(holder=self.instance, ttl_s=self.ttl_s)
        self.client.publish(self.topic, message.model_dump_json(), qos=1, retain=True)

    def _set(self, held: bool) -> None:
        if held != self._held:
            self._held = held
            self.log.info("%s %s the lease", self.instance, "holds" if held else "released")
            self._on_change(held)
