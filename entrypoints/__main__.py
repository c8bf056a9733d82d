"""``python -m entrypoints generate ...`` (the same CLI as ``python -m runners`` and ``model-runners``)."""
import sys

from entrypoints.cli import main

sys.exit(main())
