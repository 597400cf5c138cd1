"""`python train_clt.py ...` runs `matryoshka_sae.cli.train_clt` (installed as the command `sae-train-clt`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import train_clt

if __name__ == "__main__":
    train_clt.main()
else:
    sys.modules[__name__] = train_clt
