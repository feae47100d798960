"""Signed plans: an Ed25519 signature over the plan, which pins every model file by sha256.

The signature covers a canonical serialization of the plan as the services read it: the
validated `PlanMsg` dumped to JSON with sorted keys and no spaces, without the `signature`
field itself, after a domain tag (so that the bytes can mean nothing else). Fields this build
does not know are dropped by the contract before verification and so cannot be signed:
a plan with fields added by a newer signer fails closed on an older service.

Signing (`SigningKey`, used by `edvit deploy --sign-key` and the aggregator's planner) and
verifying (`TrustKey`, used by every plan follower given `--trust-key`) share this one
definition of the signed bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edvit.errors import ConfigError, IntegrityError
from edvit.schemas import PlanMsg

DOMAIN = b"edvit plan signature v1\n"
KEY_ID_CHARS = 16  # hex characters of the public key's sha256


class PlanSignatureError(IntegrityError):
    """A plan that is unsigned, or whose signature the trusted key does not verify."""


# Fields added after signing existed, left out of the signed bytes while at their default: a
# plan signed before a field existed still verifies, and one that sets it is signed with it.
LATER_FIELDS = ("untrained", "seq")


def signed_bytes(plan: PlanMsg) -> bytes:
    """The bytes a plan's signature covers: every field but the signature (and the
    ``LATER_FIELDS`` at their defaults), canonical JSON."""
    exclude = {"signature"}
    exclude |= {name for name in LATER_FIELDS if getattr(plan, name) == _default(name)}
    fields = plan.model_dump(mode="json", by_alias=True, exclude=exclude)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return DOMAIN + text.encode()


def _default(name: str) -> object:
    return PlanMsg.model_fields[name].default


def _key_id(public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None


class TrustKey:
    """The public key a service accepts plans from (`--trust-key`, PEM Ed25519)."""

    def __init__(self, public: ed25519.Ed25519PublicKey) -> None:
        self._public = public
        self.key_id = _key_id(public)

    @classmethod
    def load(cls, path: str | Path) -> TrustKey:
        data = _read(path, "trust key")
        try:
            public = serialization.load_pem_public_key(data)
        except ValueError:
            raise ConfigError(f"{path}: not a PEM public key (want signing/plan.pub)") from None
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise ConfigError(f"{path}: not an Ed25519 public key (want signing/plan.pub)")
        return cls(public)

    def verify(self, plan: PlanMsg) -> None:
        """Raise PlanSignatureError, with a one-line reason, unless this key signed `plan`."""
        if plan.signature is None:
            raise PlanSignatureError(f"unsigned; only plans signed by key {self.key_id} are served")
        if plan.key_id is not None and plan.key_id != self.key_id:
            raise PlanSignatureError(
                f"bad signature: signed by another key; only key {self.key_id} is trusted"
            )
        try:
            signature = base64.b64decode(plan.signature, validate=True)
            self._public.verify(signature, signed_bytes(plan))
        except (binascii.Error, ValueError, InvalidSignature):
            raise PlanSignatureError(
                f"bad signature: key {self.key_id} does not verify it"
            ) from None


class SigningKey:
    """The private key plans are signed with (`--sign-key`, PEM Ed25519)."""

    def __init__(self, private: ed25519.Ed25519PrivateKey) -> None:
        self._private = private
        self.trust = TrustKey(private.public_key())
        self.key_id = self.trust.key_id

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        data = _read(path, "signing key")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{path}: not an unencrypted PEM private key (want signing/plan.key)"
            ) from None
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519 private key (want signing/plan.key)")
        return cls(private)

    def sign(self, plan: PlanMsg) -> PlanMsg:
        """The plan with this key's id and signature (any earlier signature replaced)."""
        unsigned = plan.model_copy(update={"key_id": self.key_id, "signature": None})
        signature = self._private.sign(signed_bytes(unsigned))
        return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})
