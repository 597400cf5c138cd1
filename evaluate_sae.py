"""`python evaluate_sae.py ...` runs `matryoshka_sae.cli.evaluate_sae` (installed as the command `sae-evaluate`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import evaluate_sae

if __name__ == "__main__":
    evaluate_sae.main()
else:
    sys.modules[__name__] = evaluate_sae
