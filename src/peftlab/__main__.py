"""``python -m peftlab`` runs the workbench CLI (same as the ``peftlab`` command)."""

import sys

from peftlab.lab.cli import main

sys.exit(main())
