"""``python -m slora_backend.launcher``: the same as ``slora-serve``."""

import sys

from .cli import main

sys.exit(main())
