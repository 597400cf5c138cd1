"""`python inspect_sae.py ...` runs `matryoshka_sae.cli.inspect_sae` (installed as the command `sae-inspect`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import inspect_sae

if __name__ == "__main__":
    inspect_sae.main()
else:
    sys.modules[__name__] = inspect_sae
