"""``python -m neurotask``: the same as the ``neurotask`` command."""

import sys

from neurotask.pipeline.cli import main

sys.exit(main())
