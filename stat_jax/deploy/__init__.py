"""Deployment: a trained checkpoint as a classifier (inference.py), exported
to other frameworks (export.py), run on video files (predict.py). Nothing
here imports the trainer."""
