"""``python -m dmil_fast``: the ``dmil-fast`` command."""

import sys

from .cli import main

sys.exit(main())
