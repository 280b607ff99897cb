"""``python -m softpatch_cuda``: the ``softpatch`` command line."""

import sys

from .cli import main

sys.exit(main())
