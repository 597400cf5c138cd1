"""`python main.py ...` runs `matryoshka_sae.cli.main` (installed as the command `sae-train`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import main

if __name__ == "__main__":
    main.main()
else:
    sys.modules[__name__] = main
