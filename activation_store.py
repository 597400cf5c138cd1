"""`activation_store` at the repository root is `matryoshka_sae.activation_store` itself: the same module object, not a copy.

The library lives in the package `matryoshka_sae`; this name stays here for notebooks and scripts
started at the root (`import activation_store`, `from activation_store import ...`).
"""

import sys

from matryoshka_sae import activation_store

sys.modules[__name__] = activation_store
