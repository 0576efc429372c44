"""Seeing what the tokens are: `tokenmill inspect`, `tokenmill report` and `tokenmill compare`.

dataset.py reads a finished dataset through its manifest, render.py turns
tokens back into something a person reads (text pieces, images, contact
sheets), boundaries.py draws a document token by token in HTML, stats.py holds
the pure statistics, inspect.py and html.py assemble them; compare.py measures
several tokenizers on the same records (on Beam workers, through
pipelines/compare.py) and compare_page.py draws the result. Nothing here
imports Beam.
"""
