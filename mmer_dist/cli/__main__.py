"""``python -m mmer_dist.cli``: the same as the ``mmer`` script (Ray job entrypoints use it)."""

import sys

from mmer_dist.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
