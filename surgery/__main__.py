"""``python -m surgery``: the ``surgery`` command, where its console script is not on PATH."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
