"""``python -m mmspec`` runs the ``mmspec`` command (``torchrun ... -m mmspec pipeline`` starts the pipeline's
stage processes)."""

import sys

from mmspec.cli import main

sys.exit(main())
