"""dermscore: batch scoring of dermatoscopic images with an InceptionV3 + DenseNet201 ensemble.

Results are decision support for research, not a diagnosis.
"""

__version__ = "0.1.0"
