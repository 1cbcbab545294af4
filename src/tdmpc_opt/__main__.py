"""``python -m tdmpc_opt`` runs the command-line interface."""

import sys

from tdmpc_opt.cli import main

sys.exit(main())
