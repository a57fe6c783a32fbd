"""``python -m profiles ...``: alias of ``emugate profile ...`` (kept for existing scripts)."""
import sys

from emugate.profile_cli import main

sys.exit(main(prog="python -m profiles"))
