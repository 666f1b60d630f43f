"""Latency of one durable archive store, the part of a C-STORE's response time that the archive owns.

    .venv/bin/python bench/archive_store.py [--instances 500] [--rounds 3] [--gap-ms 4] [--dir DIR]

Stores ``--instances`` MR and CT instances made from ../shared/data (the bytes as received, as the listener
passes them), one at a time with ``--gap-ms`` between stores (the time a single association spends on the
network between two instances, when the archive is idle), through each way of storing, side by side and
interleaved round by round:

* ``ahead``    unnamed files (O_TMPFILE), made ahead by the archive's background thread (the listener's archive);
* ``unnamed``  unnamed files made when a store needs one;
* ``named``    a named temporary file in the series directory, then link and unlink (file systems without
  O_TMPFILE).

Prints p50, p95 and mean milliseconds per store for each. ``--dir`` picks the file system (default: a temporary
directory beside the project, on the disk the archive would use).
"""

from __future__ import annotations

import argparse
import errno
import shutil
import statistics
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pydicom import dcmread  # noqa: E402

from dicom_io.archive import Archive  # noqa: E402
from ingest import make_instances  # noqa: E402

MODES = ("ahead", "unnamed", "named")


def _archive(root: Path, mode: str) -> Archive:
    archive = Archive(root, files_ahead=4 if mode == "ahead" else 0)
    if mode == "named":  # the switch the archive makes itself where open(O_TMPFILE) fails
        archive._no_unnamed_files(OSError(errno.EOPNOTSUPP, "named temporary files asked for"))
    return archive


def store_all(root: Path, mode: str, encoded: list[bytes], gap: float) -> list[float]:
    """Milliseconds per store of every instance into a fresh archive under ``root``."""
    archive = _archive(root, mode)
    datasets = [dcmread(BytesIO(data), stop_before_pixels=True) for data in encoded]
    times = []
    try:
        for ds, data in zip(datasets, encoded):
            time.sleep(gap)
            started = time.perf_counter()
            archive.store(ds, encoded=data)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        archive.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=4.0)
    parser.add_argument("--dir", type=Path, default=ROOT.parent)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-archive-", dir=args.dir))
    try:
        files = make_instances(args.instances, work / "in")
        encoded = [path.read_bytes() for path in files]
        print(f"{len(encoded)} instances, {sum(map(len, encoded)) / len(encoded) / 1024:.0f} KiB each on average, "
              f"{args.gap_ms} ms apart, in {work}", flush=True)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES:  # interleaved: drifting machine load hits every mode alike
                measured = store_all(work / f"{mode}-{round_}", mode, encoded, args.gap_ms / 1000)
                times[mode] += measured
                print(f"round {round_ + 1} {mode:8s} p50 {statistics.median(measured):.3f} ms", flush=True)
        print(f"{'mode':8s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean ms':>8s}")
        for mode, values in times.items():
            p95 = statistics.quantiles(values, n=20)[-1]
            print(f"{mode:8s} {statistics.median(values):8.3f} {p95:8.3f} {statistics.fmean(values):8.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
