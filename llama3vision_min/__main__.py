"""``python -m llama3vision_min`` -- see ``cli.py``."""

import sys

from .cli import main

sys.exit(main())
