"""Key material: what makes a .p8 file usable as an App Store Connect key, and the reasons it is
not, without ever quoting any of it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from xcloudd.errors import looks_like_key_material

# A .p8 key is about 250 bytes; anything far larger is the wrong file.
KEY_FILE_MAX = 64 * 1024


def exposure(file: Path, mode: int) -> str | None:
    """Why key `file` with permission bits `mode` is open to others than its owner, with the fix;
    None when it is not. A key file must be its owner's alone."""
    bits = mode & 0o077
    if not bits:
        return None
    who = "others" if bits & 0o007 else "its group"
    what = "readable" if bits & 0o044 else "writable" if bits & 0o022 else "accessible"
    return (
        f"{file}: {what} by {who} (mode {mode:04o}); run chmod 600 {shlex.quote(str(file))}, "
        "or use credential:NAME with LoadCredential="
    )


def pasted_key_kind(ref: str) -> str | None:
    """What kind of key material `ref` looks like, when it is no path or reference."""
    if "-----" in ref or "PRIVATE KEY" in ref:
        return "PEM text"
    if looks_like_key_material(ref):
        return "base64 text"
    if "\n" in ref:
        return "text of several lines"
    if len(ref) > 1024:
        return "text far longer than a path"
    return None


_KEY_KINDS: tuple[tuple[type, str], ...] = (
    (rsa.RSAPrivateKey, "an RSA"),
    (dsa.DSAPrivateKey, "a DSA"),
    (ed25519.Ed25519PrivateKey, "an Ed25519"),
    (ed448.Ed448PrivateKey, "an Ed448"),
    (x25519.X25519PrivateKey, "an X25519"),
    (x448.X448PrivateKey, "an X448"),
)


_ENCRYPTED = (
    "the key is encrypted; use the unencrypted .p8 file as downloaded from App Store Connect"
)


def parse_private_key(data: bytes) -> EllipticCurvePrivateKey | str:
    """The key, or the reason it is unusable. Never includes any of `data` in the reason."""
    wanted = "App Store Connect keys are EC P-256 (.p8 files from Users and Access > Integrations)"
    if len(data) > KEY_FILE_MAX:
        return f"too large to be a .p8 key; {wanted}"
    if b"-----BEGIN" not in data:
        return f"not a PEM private key (no -----BEGIN line); {wanted}"
    if b"ENCRYPTED" in data:
        return _ENCRYPTED
    if b"PUBLIC KEY-----" in data or b"CERTIFICATE-----" in data:
        return f"holds a public key or certificate, not a private key; {wanted}"
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        return _ENCRYPTED
    except (ValueError, UnsupportedAlgorithm):
        # cryptography's own message is not passed on: it is not helpful and must not risk
        # quoting key material.
        return f"not a valid PEM private key (damaged or incomplete?); {wanted}"
    if not isinstance(key, EllipticCurvePrivateKey):
        kind = next((name for cls, name in _KEY_KINDS if isinstance(key, cls)), "a non-EC")
        return f"is {kind} key; {wanted}"
    if not isinstance(key.curve, SECP256R1):
        return f"uses curve {key.curve.name}; {wanted}"
    return key
