"""`sae` at the repository root is `matryoshka_sae.sae` itself: the same module object, not a copy.

The library lives in the package `matryoshka_sae`; this name stays here for notebooks and scripts
started at the root (`import sae`, `from sae import ...`).
"""

import sys

from matryoshka_sae import sae

sys.modules[__name__] = sae
