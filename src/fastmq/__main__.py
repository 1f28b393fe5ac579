"""``python -m fastmq ...`` is the ``fastmq`` command (see ``fastmq.cli``)."""
import sys

from .cli import main

sys.exit(main())
