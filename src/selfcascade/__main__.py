"""``python -m selfcascade``: the CLI, so launchers that run modules work (``accelerate launch -m selfcascade ...``)."""

import sys

from .cli import main

sys.exit(main())
