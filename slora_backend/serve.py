"""``python -m slora_backend.serve``: the launcher's command line (``slora_backend.launcher``)."""

import sys

from .launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
