"""`python cache_activations.py ...` runs `matryoshka_sae.cli.cache_activations` (installed as the command `sae-cache-activations`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import cache_activations

if __name__ == "__main__":
    cache_activations.main()
else:
    sys.modules[__name__] = cache_activations
