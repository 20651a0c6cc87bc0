"""``python -m sftlab.report <sweep dir>``."""

import sys

from sftlab.report import main

sys.exit(main())
