"""The radiologists' web worklist (FastAPI): :func:`worker.web.app.create_app`, ``dicom-triage web``/``users``."""
