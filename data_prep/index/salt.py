"""The site secret of the keyed hashes: it lives in the library (radnet.dicom.salt), which
the ``predict`` task also reads, so both give the same keys; re-exported here.

The patient split is drawn from the keys, so it depends on the secret as well. Only the demo
(launch/demo.sh) writes a fixed, public salt file, so that fresh demos reproduce one split and
one set of figures; a real site keeps the random secret ``load_salt`` creates."""

from radnet.dicom.salt import DEFAULT_SALT_FILE, load_salt, salt_fingerprint  # noqa: F401
