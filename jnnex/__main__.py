"""``python -m jnnex`` is the ``jnnex`` command."""

import sys

from jnnex.cli import main

sys.exit(main())
