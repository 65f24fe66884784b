"""`python -m memserve.clients.cli ...` runs `memserve ...`."""

import sys

from memserve.clients.cli import main

sys.exit(main())
