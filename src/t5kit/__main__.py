"""``python -m t5kit``: the command line (see ``t5kit.cli``)."""

import sys

from .cli import main

sys.exit(main())
