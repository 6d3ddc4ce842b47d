"""The workbench: experiments as YAML, training with the HF Trainer, results as JSON, reports.

It depends on the library and never the reverse; ``peftlab`` (the CLI) lives in ``cli.py``.
"""

from peftlab.lab import quiet as _quiet

_quiet.apply()  # the CLI and the worker processes alike: third-party noise only with -v
