"""``python -m torch_dmc ...`` is the ``dmc`` command (see `torch_dmc.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
