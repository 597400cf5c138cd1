"""The command-line entry points: one module per script, each with `main(argv=None)`.

The repository root keeps a thin file per script (`python main.py`, `python train_clt.py`, ...);
`pip install .` installs them as console scripts (`sae-train`, `sae-train-clt`, ...).
"""
