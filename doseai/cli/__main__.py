"""``python -m doseai.cli``: the same as the ``doseai`` command."""

import sys

from doseai.cli import main

sys.exit(main())
