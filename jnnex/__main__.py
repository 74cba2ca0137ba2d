"""``python -m jnnex`` is the ``jnnex`` command."""

import sys

from jnnex.launch import main

sys.exit(main())
