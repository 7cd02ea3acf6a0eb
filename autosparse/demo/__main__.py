"""``python -m autosparse.demo``: the same as ``autosparse demo``."""

import sys

from autosparse.demo.run import main

sys.exit(main())
