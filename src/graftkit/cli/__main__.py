"""``python -m graftkit.cli``: the ``graft`` command."""

import sys

from graftkit.cli import main

sys.exit(main())
