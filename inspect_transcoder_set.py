"""`python inspect_transcoder_set.py ...` runs `matryoshka_sae.cli.inspect_transcoder_set` (installed as the command `sae-inspect-set`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import inspect_transcoder_set

if __name__ == "__main__":
    inspect_transcoder_set.main()
else:
    sys.modules[__name__] = inspect_transcoder_set
