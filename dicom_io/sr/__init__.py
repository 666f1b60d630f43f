"""Classification results as DICOM Structured Reports: the TID 1500 writer and its reader."""

from dicom_io.sr.reader import describe, read_classification_sr
from dicom_io.sr.results import AlgorithmInfo, ClassificationReport, ClassificationResult
from dicom_io.sr.writer import SRError, SRUids, build_classification_sr, sr_uids

__all__ = [
    "AlgorithmInfo",
    "ClassificationReport",
    "ClassificationResult",
    "SRError",
    "SRUids",
    "build_classification_sr",
    "describe",
    "read_classification_sr",
    "sr_uids",
]
