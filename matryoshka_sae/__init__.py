"""Matryoshka sparse autoencoders and transcoders on TransformerLens activations.

One module per concept, imported by its name (`matryoshka_sae.sae`, `matryoshka_sae.training`,
...); the command-line entry points live in `matryoshka_sae.cli`. Importing the package itself loads
nothing else, so `import matryoshka_sae` is instant and works without the model stack.
"""

__version__ = "0.2.0"
