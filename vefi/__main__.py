"""``python -m vefi``: see :mod:`vefi.book.cli`."""

import sys

from vefi.book.cli import main

if __name__ == "__main__":
    sys.exit(main())
