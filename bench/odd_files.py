"""Both classifiers on files that are nobody's chest CT or brain MR: pydicom's own test files and pydicom-data's.

Every image file of the two sets becomes a series of its own, labelled out of domain, and goes through the worker's
path (:func:`worker.evaluation.evaluate_series`: routing, decoding, regions, the domain check, the decision). Each
must come back not applicable or indeterminate, never a class, and none may stop the run. The script prints, per task,
how many were handled and every file that was not, with its answer.

pydicom's test files come with the installed package; pydicom-data (MIT; the files ``get_testdata_file`` downloads)
is read from a bare mirror (the ``fetch`` tool's ``/work/.mirror/pydicom+pydicom-data/repo``, commit
b0d40d1e0a42c5696936043bbd8059984259cd33 when measured), written under ``--dest``:

    .venv/bin/python bench/odd_files.py --pydicom-data /work/.mirror/pydicom+pydicom-data/repo --dest /tmp/odd
"""

from __future__ import annotations

import argparse
import subprocess
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import dcmread

from config import DEFAULT_ROUTING_RULES
from models.inference import Classifier, default_model_dir
from models.tasks import BRAIN_TUMOR, COVID_CT, INDETERMINATE
from worker.evaluation import NOT_APPLICABLE, OUT_OF_DOMAIN, evaluate_series, find_series


def _keep(folder: Path, name: str, data: bytes) -> bool:
    """Write ``data`` as ``folder/name`` when pydicom reads an image from it; whether it did."""
    try:
        if "PixelData" not in dcmread(BytesIO(data), force=True):
            return False
    except Exception:  # noqa: BLE001 - a file pydicom cannot parse is no image to classify
        return False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return True


def build_tree(dest: Path, pydicom_data: Path | None) -> int:
    """One folder per image file under ``dest/out-of-domain/SOURCE/NAME``; returns how many."""
    count = 0
    source = Path(pydicom.__file__).parent / "data" / "test_files"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        # dicomdirtests' files share names across folders: the folder path keeps them apart.
        folder = dest / OUT_OF_DOMAIN / "pydicom" / "_".join(path.relative_to(source).parts)
        count += _keep(folder, path.name, path.read_bytes())
    if pydicom_data is not None:
        names = subprocess.run(["git", "-C", str(pydicom_data), "ls-tree", "-r", "--name-only", "HEAD",
                                "data_store/data/"], check=True, capture_output=True, text=True).stdout.split()
        for name in names:
            if not name.endswith(".dcm"):
                continue
            shown = subprocess.run(["git", "-C", str(pydicom_data), "show", f"HEAD:{name}"], capture_output=True)
            if shown.returncode != 0:  # a file the mirror holds only as a pointer
                continue
            folder = dest / OUT_OF_DOMAIN / "pydicom-data" / Path(name).stem
            count += _keep(folder, Path(name).name, shown.stdout)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pydicom-data", type=Path, help="bare git mirror of pydicom/pydicom-data")
    parser.add_argument("--dest", type=Path, required=True, help="where the tree is written (emptied first)")
    args = parser.parse_args()
    if args.dest.exists() and any(args.dest.iterdir()):
        parser.error(f"{args.dest} is not empty")
    warnings.simplefilter("ignore")  # the files are odd on purpose; pydicom says so for each
    print(f"{build_tree(args.dest, args.pydicom_data)} image files")
    for task in (COVID_CT, BRAIN_TUMOR):
        series = find_series(args.dest, None, task)
        outcomes = evaluate_series(series, task, Classifier.load(default_model_dir(task.name)),
                                   DEFAULT_ROUTING_RULES)
        missed = [o for o in outcomes if o.result not in (NOT_APPLICABLE, INDETERMINATE)]
        print(f"{task.name}: {len(outcomes) - len(missed)} of {len(outcomes)} handled")
        for outcome in missed:
            print(f"  {outcome.name}: {outcome.result} {outcome.suspicion} ({outcome.slices_read}/{outcome.slices})")


if __name__ == "__main__":
    main()
