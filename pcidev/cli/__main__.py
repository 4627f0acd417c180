"""``python -m pcidev.cli``: the same as the ``pcidev`` command."""

from __future__ import annotations

import sys

from pcidev.cli import main

sys.exit(main())
