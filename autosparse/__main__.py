"""``python -m autosparse``: the command line (see :mod:`autosparse.cli`)."""

from __future__ import annotations

import sys

from autosparse.cli import main

sys.exit(main())
