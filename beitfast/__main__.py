"""``python -m beitfast``: the ``beitfast`` command."""

import sys

from .cli import main

sys.exit(main())
