"""``python -m tnexp.aggregate``: the same as ``tnexp-aggregate``."""

import sys

from tnexp.aggregate.cli import main

sys.exit(main())
