"""The contrast an MR series is weighted for, read from the physics in its header (PS3.3 C.8.3.1 MR Image module,
C.8.13 Enhanced MR Image and its functional groups), not from its description.

Only what the header shows plainly is named; anything else, T1-weighted sequences included, is ``None``:

* ``echo-planar``: Scanning Sequence ``EP`` or Echo Planar Pulse Sequence ``YES`` (diffusion, perfusion, fMRI);
* ``FLAIR``: an inversion time of at least :data:`FLUID_NULLING_TI_MS` (fluid nulled; STIR, MPRAGE and T1-FLAIR
  invert at 150-1100 ms);
* ``T2-weighted``: an echo time of at least :data:`LONG_TE_MS` (T1-weighted spin echo uses 8-20 ms);
* ``T2*-weighted``: gradient echo with an echo time of at least :data:`LONG_GRADIENT_TE_MS` (susceptibility-weighted
  and T2* sequences; T1-weighted gradient echo uses 2-10 ms);
* ``proton density-weighted``: spin echo, no inversion, repetition time of at least :data:`LONG_TR_MS` and a short
  echo time (T1-weighted spin echo repeats within 400-800 ms).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset

from dicom_io.imaging import functional_group_item

__all__ = ["FLUID_NULLING_TI_MS", "LONG_GRADIENT_TE_MS", "LONG_TE_MS", "LONG_TR_MS", "Weighting", "contrast_given",
           "mr_weighting"]

FLUID_NULLING_TI_MS = 1500.0
LONG_TE_MS = 50.0
LONG_GRADIENT_TE_MS = 15.0
LONG_TR_MS = 1500.0


@dataclass(frozen=True)
class Weighting:
    """A weighting the header shows, and the figure it was read from."""

    #: ``echo-planar``, ``FLAIR``, ``T2-weighted``, ``T2*-weighted`` or ``proton density-weighted``.
    name: str
    #: e.g. ``"inversion time 2200 ms"``.
    basis: str

    def describe(self) -> str:
        """``"FLAIR (inversion time 2200 ms)"``."""
        return f"{self.name} ({self.basis})"


def mr_weighting(ds: Dataset) -> Weighting | None:
    """The weighting of the MR image ``ds`` when its header shows one that is not T1 (module docstring); ``None``
    for T1-weighted images, images of another modality, and headers without the figures."""
    if str(ds.get("Modality", "")).upper() != "MR":
        return None
    sequences = _scanning_sequences(ds)
    if "EP" in sequences or str(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES":
        return Weighting("echo-planar", "echo planar pulse sequence")
    inversion = _inversion_time(ds)
    if inversion is not None and inversion >= FLUID_NULLING_TI_MS:
        return Weighting("FLAIR", f"inversion time {inversion:g} ms")
    echo = _echo_time(ds)
    if echo is None:
        return None
    if echo >= LONG_TE_MS:
        return Weighting("T2-weighted", f"echo time {echo:g} ms")
    if "GR" in sequences and echo >= LONG_GRADIENT_TE_MS:
        return Weighting("T2*-weighted", f"gradient echo, echo time {echo:g} ms")
    repetition = _number(_attribute(ds, "RepetitionTime"))
    if ("SE" in sequences and not sequences & {"IR", "GR"} and inversion is None and repetition is not None
            and repetition >= LONG_TR_MS):
        return Weighting("proton density-weighted", f"spin echo, repetition time {repetition:g} ms, echo time "
                                                    f"{echo:g} ms")
    return None


def contrast_given(ds: Dataset) -> bool:
    """Whether the header names a contrast agent given for the image (PS3.3 C.7.6.4 Contrast/Bolus module: Contrast/
    Bolus Agent, or its Enhanced form, the Contrast/Bolus Agent Sequence). An empty value says none was."""
    agent = _attribute(ds, "ContrastBolusAgent")
    return bool(str(agent).strip()) if agent is not None else bool(_attribute(ds, "ContrastBolusAgentSequence"))


def _scanning_sequences(ds: Dataset) -> set[str]:
    """Scanning Sequence's defined terms (SE, IR, GR, EP, RM); the Enhanced MR Echo Pulse Sequence as SE or GR."""
    terms = {str(v).strip().upper() for v in _values(_attribute(ds, "ScanningSequence")) if v}
    pulse = str(ds.get("EchoPulseSequence", "")).upper()
    if pulse in ("SPIN", "BOTH"):
        terms.add("SE")
    if pulse in ("GRADIENT", "BOTH"):
        terms.add("GR")
    if str(ds.get("InversionRecovery", "")).upper() == "YES":
        terms.add("IR")
    return terms


def _echo_time(ds: Dataset) -> float | None:
    echo = functional_group_item(ds, 0, "MREchoSequence")
    return _number(_attribute(ds, "EchoTime")) if echo is None else _number(_attribute(echo, "EffectiveEchoTime"))


def _inversion_time(ds: Dataset) -> float | None:
    modifier = functional_group_item(ds, 0, "MRModifierSequence")
    if modifier is None:
        return _number(_attribute(ds, "InversionTime"))
    if str(modifier.get("InversionRecovery", "")).upper() != "YES":
        return None
    times = _values(_attribute(modifier, "InversionTimes"))
    return _number(times[0]) if times else None


def _attribute(ds: Dataset, keyword: str) -> object:
    """``ds``'s value of ``keyword``, ``None`` when missing or when pydicom cannot convert it (a malformed DS)."""
    try:
        return ds.get(keyword)
    except (TypeError, ValueError):
        return None


def _values(value: object) -> list[object]:
    """A DICOM value as a list: a multi-valued one's items, a single value alone, nothing for ``None``."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _number(value: object) -> float | None:
    """A positive finite number from a DS/FD value (``None`` when missing, empty or malformed)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
