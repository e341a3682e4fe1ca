"""`python -m proxy` is the same as the `pleo-proxy` command."""

import sys

from proxy.cli import main

sys.exit(main())
