"""Seeing what the tokens are: `tokenmill inspect` and `tokenmill report`.

dataset.py reads a finished dataset through its manifest, render.py turns
tokens back into something a person reads (text pieces, images, contact
sheets), stats.py holds the pure statistics, inspect.py and html.py assemble
them. Nothing here imports Beam.
"""
