"""`training` at the repository root is `matryoshka_sae.training` itself: the same module object, not a copy.

The library lives in the package `matryoshka_sae`; this name stays here for notebooks and scripts
started at the root (`import training`, `from training import ...`).
"""

import sys

from matryoshka_sae import training

sys.modules[__name__] = training
