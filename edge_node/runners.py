"""How a node turns one batch of requests into feature vectors, one ONNX Runtime call per
model per batch.

A request enters at a block boundary: a frame enters before the patch embedding, tokens
that a camera computed through its first J stem blocks enter at block J. Three runners:

- WholeModels: bundles without a shared stem; every sub-model runs on the images.
- PerEntry: one session per entry block holding blocks J..K-1, so requests that entered at
  the same block run together in one call; more model memory (block i is loaded i+1
  times), no copies.
- Merged: one session per block; requests that entered at block J join the running batch
  when it reaches block J; each block loaded once, at the cost of concatenating arrays.

Both stem runners run the rest of the stem once per request and then every sub-model's
tail on the tokens at block K, so a node serving several sub-models shares the stem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edvit.bundle import FEATURES_OUTPUT, IMAGE_INPUT, TOKENS_INPUT, TOKENS_OUTPUT
from edvit.inference import make_session

IMAGE_ENTRY = -1  # a frame: the patch embedding runs first


@dataclass(frozen=True)
class Request:
    entry: int  # IMAGE_ENTRY or the block index the tokens enter at
    array: np.ndarray  # image [C, H, W] or tokens [T, D], float32


class _Session:
    def __init__(self, model: bytes, threads: int, input_name: str, output_name: str):
        self.session = make_session(model, threads)
        self.input_name, self.output_name = input_name, output_name
        self.bytes = len(model)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class WholeModels:
    """Sub-models as whole ONNX files: image -> features."""

    def __init__(self, models: dict[str, bytes], threads: int = 1) -> None:
        self.models = {
            sid: _Session(blob, threads, IMAGE_INPUT, FEATURES_OUTPUT)
            for sid, blob in models.items()
        }

    @property
    def model_bytes(self) -> int:
        return sum(s.bytes for s in self.models.values())

    def __call__(self, requests: list[Request]) -> dict[str, np.ndarray]:
        if any(r.entry != IMAGE_ENTRY for r in requests):
            raise ValueError("this bundle has no shared stem: only frames can be served")
        images = np.stack([r.array for r in requests])
        return {sid: model(images) for sid, model in sorted(self.models.items())}


class _StemRunner:
    """The embedding, one stem session per shared block (what a session holds is the
    strategy's choice) and the tails."""

    def __init__(self, embed: bytes, stem: list[bytes], tails: dict[str, bytes],
                 threads: int = 1) -> None:  # fmt: skip
        self.blocks = len(stem)
        self.embed = _Session(embed, threads, IMAGE_INPUT, TOKENS_OUTPUT)
        self.stem = [_Session(b, threads, TOKENS_INPUT, TOKENS_OUTPUT) for b in stem]
        self.tails = {
            sid: _Session(b, threads, TOKENS_INPUT, FEATURES_OUTPUT) for sid, b in tails.items()
        }

    @property
    def model_bytes(self) -> int:
        sessions = [self.embed, *self.stem, *self.tails.values()]
        return sum(s.bytes for s in sessions)

    def _entries(self, requests: list[Request]) -> list[tuple[int, list[int], np.ndarray]]:
        """(entry block, request indices, tokens) in block order; frames are embedded first
        and join the tokens that entered at block 0."""
        by_entry: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_entry.setdefault(request.entry, []).append(index)
        joined: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        for entry, indices in sorted(by_entry.items()):
            tokens = np.stack([requests[i].array for i in indices])
            if entry == IMAGE_ENTRY:
                entry, tokens = 0, self.embed(tokens)
            bucket = joined.setdefault(entry, ([], []))
            bucket[0].extend(indices)
            bucket[1].append(tokens)
        return [
            (entry, indices, parts[0] if len(parts) == 1 else np.concatenate(parts))
            for entry, (indices, parts) in sorted(joined.items())
        ]

    def _tails(self, order: list[int], tokens: np.ndarray) -> dict[str, np.ndarray]:
        inverse = np.argsort(np.asarray(order))
        return {sid: tail(tokens)[inverse] for sid, tail in sorted(self.tails.items())}


class PerEntry(_StemRunner):
    """stem[j] holds blocks j..K-1."""

    def __call__(self, requests: list[Request]) -> dict[str, np.ndarray]:
        order: list[int] = []
        at_k: list[np.ndarray] = []
        for entry, indices, tokens in self._entries(requests):
            at_k.append(tokens if entry == self.blocks else self.stem[entry](tokens))
            order.extend(indices)
        return self._tails(order, at_k[0] if len(at_k) == 1 else np.concatenate(at_k))


class Merged(_StemRunner):
    """stem[i] holds block i alone."""

    def __call__(self, requests: list[Request]) -> dict[str, np.ndarray]:
        joining = {entry: (indices, tokens) for entry, indices, tokens in self._entries(requests)}
        order: list[int] = []
        running: np.ndarray | None = None
        for block in range(self.blocks + 1):
            if block in joining:
                indices, tokens = joining[block]
                order.extend(indices)
                running = tokens if running is None else np.concatenate([running, tokens])
            if block < self.blocks and running is not None:
                running = self.stem[block](running)
        assert running is not None
        return self._tails(order, running)
