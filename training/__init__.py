"""training: turn HAM10000-style data into a dermscore model bundle, with an honest evaluation.

Steps (each a ``python -m training <step>`` command, see ``training/cli.py``): index the metadata and
images, split by lesion, explore the data, train each member, fit the ensemble weights on validation,
evaluate on test, export the bundle. The model and training code use Keras 3 APIs only (no
``import tensorflow``), so the same code trains under any Keras backend. ``dermscore`` never imports
this package; this package imports ``dermscore`` for the bundle format and the preprocessing, so that
images are prepared for training exactly as they are for scoring.
"""
