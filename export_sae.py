"""`python export_sae.py ...` runs `matryoshka_sae.cli.export_sae` (installed as the command `sae-export`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import export_sae

if __name__ == "__main__":
    export_sae.main()
else:
    sys.modules[__name__] = export_sae
