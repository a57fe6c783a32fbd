"""``python -m emugate`` = ``emugate``."""
import sys

from emugate.cli import main

sys.exit(main())
