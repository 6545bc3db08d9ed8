"""``python -m radnet.native``: build the oneDNN convolutions (see radnet/native/__init__.py).

Exit 0 when built; exit 2 with one line when it cannot be (radnet then uses XLA's
convolutions on the CPU, slower but the same numbers)."""

import sys

from radnet import native


def main() -> int:
    try:
        path = native.build()
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        print(f"radnet.native: not built ({first}); the CPU will use XLA's convolutions",
              file=sys.stderr)
        return 2
    print(f"radnet.native: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
