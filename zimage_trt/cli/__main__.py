"""``python -m zimage_trt.cli``: the ``zimage-trt`` command."""

import sys

from zimage_trt.cli import main

sys.exit(main())
