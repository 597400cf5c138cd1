"""`python train_gemma_example.py ...` runs `matryoshka_sae.cli.train_gemma_example` (installed as the command `sae-train-gemma`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import train_gemma_example

if __name__ == "__main__":
    train_gemma_example.main()
else:
    sys.modules[__name__] = train_gemma_example
