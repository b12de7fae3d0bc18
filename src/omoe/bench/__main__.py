"""``python -m omoe.bench``."""

import sys

from omoe.bench import main

sys.exit(main())
