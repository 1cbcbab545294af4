"""``python -m tdmpc_opt.cli`` (and ``torchrun -m tdmpc_opt.cli``) runs the command line."""

import sys

from tdmpc_opt.cli import main

sys.exit(main())
