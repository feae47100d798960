"""Head slices on the camera: run the patch embedding and the first J stem blocks here and
send tokens instead of the frame (`edvit camera --head-slices J`).

The camera follows the retained plan like every other service (edvit/retained.py): it
fetches the slices each new plan names, verifies their sha256 and loads them off the
network thread. Tokens go out only while the slices of the newest plan are loaded; while
a new plan loads, or when it cannot be served with J head slices (no stem, fewer blocks),
the camera sends plain frames, which every plan can serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edvit.bundle import IMAGE_INPUT, TOKENS_INPUT, TOKENS_OUTPUT
from edvit.errors import ConfigError
from edvit.inference import make_session
from edvit.mqtt import Transport
from edvit.preprocess import to_model_input
from edvit.replay import PlanSequence
from edvit.retained import PlanFollower
from edvit.schemas import FeatureDtype, PlanMsg, StemRef
from edvit.signing import TrustKey
from edvit.topics import Topics

log = logging.getLogger("edvit.camera")


@dataclass(frozen=True)
class _Sessions:
    embed: ort.InferenceSession
    blocks: tuple[ort.InferenceSession, ...]


class HeadSlices:
    """The first `count` stem blocks of the newest plan: image -> tokens at block `count`."""

    def __init__(
        self,
        count: int,
        dtype: FeatureDtype = "float32",
        threads: int = 1,
        trust_key: TrustKey | None = None,
        state_dir: Path | None = None,
    ) -> None:
        if count < 1:
            raise ConfigError("--head-slices must be at least 1 to send tokens")
        self.count, self.dtype, self.threads = count, dtype, threads
        self.trust_key = trust_key
        self.state_dir = state_dir
        self.follower: PlanFollower[_Sessions] | None = None

    def follow(
        self, client: Transport, topics: Topics, on_update: Callable[[], None] | None = None
    ) -> None:
        """Follow the plan; `on_update` is called whenever what is served, or why not, changes."""
        self.follower = PlanFollower(
            client, topics, self._model_ids, self._load, logger=log, trust_key=self.trust_key,
            on_update=on_update, sequence=PlanSequence(self.state_dir, log),
        )  # fmt: skip
        self.follower.start()

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()

    def wait_first_plan(self, topics: Topics, timeout: float = 30.0) -> None:
        """Wait until the first plan's slices are loaded; ConfigError if it cannot be served
        with these head slices or nothing comes in time."""
        assert self.follower is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.follower.ready:
                log.info("running %d head slices here; sending tokens", self.count)
                return
            if self.follower.refused:
                raise ConfigError(self.follower.refused)
            time.sleep(0.05)
        if self.follower.target is None:
            raise ConfigError(f"no plan on {topics.plan()} within {timeout:.0f} s; deploy first")
        missing = sorted(set(self._model_ids(self.follower.target)) - self.follower.received())
        raise ConfigError(f"stem slices {missing} did not arrive within {timeout:.0f} s")

    def _model_ids(self, plan: PlanMsg) -> dict[str, str]:
        stem = plan.stem
        if stem is None:
            raise ConfigError(
                "the deployed bundle has no shared stem; build it with --shared-blocks K "
                "to use --head-slices"
            )
        if self.count > stem.blocks:
            raise ConfigError(
                f"--head-slices {self.count} asks for more blocks than the bundle's stem "
                f"has ({stem.blocks})"
            )
        return {mid: stem.slices[mid] for mid in stem.head_ids(self.count)}

    def _load(self, _plan: PlanMsg, blobs: dict[str, bytes]) -> _Sessions:
        return _Sessions(
            make_session(blobs[StemRef.EMBED_ID], self.threads),
            tuple(
                make_session(blobs[StemRef.block_id(i)], self.threads) for i in range(self.count)
            ),
        )

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, str] | None:
        """uint8 image (BGR or grey) -> (tokens [T, D] at block `count` in `dtype`, plan id),
        or None when the newest plan's slices are not loaded (send the frame instead)."""
        follower = self.follower
        if follower is None or not follower.ready or follower.refused:
            return None
        active = follower.active
        if active is None:
            return None
        x = to_model_input(image, active.plan.preprocessing)[None]
        tokens = active.runtime.embed.run([TOKENS_OUTPUT], {IMAGE_INPUT: x})[0]
        for block in active.runtime.blocks:
            tokens = block.run([TOKENS_OUTPUT], {TOKENS_INPUT: tokens})[0]
        out = tokens[0].astype(np.float16 if self.dtype == "float16" else np.float32)
        return out, active.plan.plan_id
