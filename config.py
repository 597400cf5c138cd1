"""`config` at the repository root is `matryoshka_sae.config` itself: the same module object, not a copy.

The library lives in the package `matryoshka_sae`; this name stays here for notebooks and scripts
started at the root (`import config`, `from config import ...`).
"""

import sys

from matryoshka_sae import config

sys.modules[__name__] = config
