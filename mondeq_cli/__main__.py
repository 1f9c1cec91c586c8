"""``python -m mondeq_cli ARGS`` ≡ ``mondeq ARGS``."""

import sys

from .main import main

sys.exit(main())
