"""`python -m dkim_sidecar.cli`: the same command as `dkim-sidecar`."""

import sys

from . import main

sys.exit(main())
