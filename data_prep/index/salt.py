"""The site secret of the keyed hashes: no raw identifier leaves the input, and keys are
stable on one site and meaningless elsewhere.

The patient split is drawn from the keys, so it depends on the secret as well. Only the demo
(launch/demo.sh) writes a fixed, public salt file, so that fresh demos reproduce one split and
one set of figures; a real site keeps the random secret ``load_salt`` creates."""

from __future__ import annotations

import os
import secrets

from absl import logging

from radnet.dicom import headers as dicom_headers

DEFAULT_SALT_FILE = "~/.config/radnet/salt"


def load_salt(path: str) -> bytes:
    """The site secret for keyed hashes; created (random, mode 600) when missing."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        logging.info("created a new salt file %s (keep it: keys depend on it)", path)
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"salt file {path} holds {len(secret)} bytes; need at least 16")
    return secret


def salt_fingerprint(secret: bytes) -> str:
    """Identifies the salt in the cache header without revealing it."""
    return dicom_headers.keyed_hash(secret, "fingerprint", "radnet-index", digest_size=8)

