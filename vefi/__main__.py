"""``python -m vefi``: see :mod:`vefi.cli`."""

import sys

from vefi.cli import main

if __name__ == "__main__":
    sys.exit(main())
