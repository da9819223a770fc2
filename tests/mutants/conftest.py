"""The mutation suite imports its machinery as `mutation` (tests are not a package)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
