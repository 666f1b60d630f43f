"""Memory and time of a streamed WADO-RS series retrieval (issue 19): does memory stay at one instance?

    .venv/bin/python bench/dicomweb_retrieve.py [--instances 20 200]

For each count, Orthanc with Debian's DICOMweb plugin (in its own ``unshare -n`` namespace, as the tests run it) is
loaded with one MR series of that many instances (images from ../shared/data), then
:meth:`dicom_io.dicomweb.DicomwebSource.iter_series` retrieves it inside the namespace while ``tracemalloc`` records
the peak of Python allocations. Prints one JSON line per count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dicom_factory import brain_images, write_files  # noqa: E402
from dicom_io.synthesis import mr_series  # noqa: E402
from test_dicomweb import DICOMWEB_CONFIG, ORTHANC_DICOMWEB  # noqa: E402
from test_orthanc_roundtrip import orthanc_world  # noqa: E402

_MEASURE = """
import json, sys, time, tracemalloc
from dicom_io.dicomweb import DicomwebSource
source = DicomwebSource(sys.argv[1])
tracemalloc.start()
started, count, pixel_bytes = time.monotonic(), 0, 0
for ds in source.iter_series(sys.argv[2], sys.argv[3]):
    count, pixel_bytes = count + 1, pixel_bytes + len(ds.PixelData)
print(json.dumps({"instances": count, "pixel_data_kib": pixel_bytes // 1024,
                  "peak_traced_kib": tracemalloc.get_traced_memory()[1] // 1024,
                  "seconds": round(time.monotonic() - started, 2)}))
"""


def measure(count: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as directory, orthanc_world(Path(directory), **DICOMWEB_CONFIG) as (
            netns, orthanc, _started):
        series = mr_series(brain_images(count, seed=5), when=datetime.datetime(2024, 1, 1, 9, 0))
        for path in write_files(series, Path(directory) / "upload"):
            orthanc.post("/instances", "--data-binary", f"@{path}")
        run = netns.run([sys.executable, "-c", _MEASURE, ORTHANC_DICOMWEB, str(series[0].StudyInstanceUID),
                         str(series[0].SeriesInstanceUID)], cwd=ROOT)
        if run.returncode:
            raise SystemExit(run.stderr[-2000:])
        result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[20, 200])
    for count in parser.parse_args().instances:
        print(json.dumps(measure(count)), flush=True)


if __name__ == "__main__":
    main()
