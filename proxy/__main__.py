"""`python -m proxy` is `outgate`."""

import sys

from proxy.cli import main

sys.exit(main())
