"""`python trace_circuit.py ...` runs `matryoshka_sae.cli.trace_circuit` (installed as the command `sae-trace`).

Imported, this name is that module itself (the same object), as for the user's names at the root.
"""

import sys

from matryoshka_sae.cli import trace_circuit

if __name__ == "__main__":
    trace_circuit.main()
else:
    sys.modules[__name__] = trace_circuit
