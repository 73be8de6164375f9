"""``python -m llama3vision_min ask | export`` -- the command line lives in ``tools/cli.py``."""

import sys

from .tools.cli import main

sys.exit(main())
