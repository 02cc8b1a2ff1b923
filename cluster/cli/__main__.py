"""``python -m cluster.cli``: the ``genfleet`` command."""

import sys

from cluster.cli.main import main

sys.exit(main())
