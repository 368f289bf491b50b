"""``python -m surgery.cli``: the ``surgery`` command."""

import sys

from .main import main

sys.exit(main())
