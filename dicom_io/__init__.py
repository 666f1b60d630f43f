"""DICOM bytes, datasets, pixel arrays, Structured Reports and networking.

Knows nothing of the database, Celery or the models.
"""
