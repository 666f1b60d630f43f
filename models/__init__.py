"""Classifier architectures, saved weights with their cards, preprocessing and inference.

Knows nothing of DICOM, the database or Celery: it takes display images (2-D arrays of grey values 0..255)
and returns class probabilities.
"""
