"""``python -m autosparse``: the command line (see :mod:`autosparse.cli`)."""

from __future__ import annotations

import sys

from autosparse.cli import main

if __name__ == "__main__":  # not when a spawned worker (the demo's baseline) imports the parent's main module
    sys.exit(main())
