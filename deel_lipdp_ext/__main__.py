"""`python -m deel_lipdp_ext demo`."""

import sys

from .cli import main

sys.exit(main())
