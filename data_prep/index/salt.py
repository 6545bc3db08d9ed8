"""The site secret of the keyed hashes: it lives in the library (radnet.dicom.salt), which
the ``predict`` task also reads, so both give the same keys; re-exported here."""

from radnet.dicom.salt import DEFAULT_SALT_FILE, load_salt, salt_fingerprint  # noqa: F401
