"""``python -m compat.serving ENGINE DEVICE``: build one serving engine's environment ahead of its cells."""

import sys

from compat.serving.engines import main

sys.exit(main(sys.argv[1:]))
