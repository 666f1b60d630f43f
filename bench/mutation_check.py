"""Mutation check of the test suite (issue 24): break a result on purpose and show that a test fails.

``model``: a copy of a shipped model with one layer's weights shuffled (a seeded permutation of its kernel) is held
to its card by ``tests/test_shipped_models.py``'s own test function, pointed at the copy; the unchanged model is
scored the same way first. Exit 0 when the unchanged model passes and the shuffled one fails.

``ct-window``: a copy of this checkout (``git archive HEAD``) whose ``dicom_io.imaging.LUNG_WINDOW`` is swapped for
a soft-tissue window (W 400 / L 40) runs the given test files (as committed); exit 0 when at least one test fails
there.

    .venv/bin/python bench/mutation_check.py model --task brain-tumor
    .venv/bin/python bench/mutation_check.py ct-window tests/test_imaging.py

Nothing is written outside a temporary directory; the shipped models and this checkout are left as they are.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WINDOW = "LUNG_WINDOW = Window(center=-600.0, width=1500.0)"
SOFT_TISSUE_WINDOW = "LUNG_WINDOW = Window(center=40.0, width=400.0)"


def shuffle_layer(model_dir: Path, layer_name: str | None, seed: int) -> str:
    """Permute the kernel of one layer of ``model_dir/model.keras`` in place; returns the layer's name (by default
    the last layer with a kernel: the classifier head)."""
    import keras
    import numpy as np

    path = model_dir / "model.keras"
    model = keras.models.load_model(path, compile=False)
    layers = [layer for layer in _all_layers(model) if any("kernel" in w.path for w in layer.weights)]
    layer = next(layer for layer in layers if layer.name == layer_name) if layer_name else layers[-1]
    kernel = next(w for w in layer.weights if "kernel" in w.path)
    values = np.asarray(kernel.numpy())
    kernel.assign(np.random.default_rng(seed).permutation(values.ravel()).reshape(values.shape))
    model.save(path)
    return str(layer.name)


def _all_layers(model):  # type: ignore[no-untyped-def]
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        yield layer


def held_to_card(task: str, model_dir: Path) -> str | None:
    """None when the model in ``model_dir`` passes tests/test_shipped_models.py's test for ``task``; else the
    failure's message."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_shipped_models as shipped

    (case,) = [c for c in shipped.CASES if c[0] == task]
    original = shipped.default_model_dir
    shipped.default_model_dir = lambda name: model_dir  # the test scores the copy
    try:
        shipped.test_shipped_model_reaches_its_card_on_its_evaluation_split(*case)
        return None
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    finally:
        shipped.default_model_dir = original


def check_model(task: str, layer: str | None, seed: int) -> int:
    from models.inference import default_model_dir

    with tempfile.TemporaryDirectory() as temporary:
        copy = Path(temporary) / task
        shutil.copytree(default_model_dir(task), copy)
        started = time.monotonic()
        before = held_to_card(task, copy)
        print(f"{task} unchanged: {'passes' if before is None else 'FAILS: ' + before} "
              f"({time.monotonic() - started:.0f} s)")
        name = shuffle_layer(copy, layer, seed)
        started = time.monotonic()
        after = held_to_card(task, copy)
        print(f"{task} with layer {name!r} shuffled (seed {seed}): "
              f"{'passes: the test did not notice' if after is None else 'fails: ' + after} "
              f"({time.monotonic() - started:.0f} s)")
    return 0 if before is None and after is not None else 1


def check_ct_window(test_files: list[str]) -> int:
    with tempfile.TemporaryDirectory() as temporary:
        tree = Path(temporary) / "tree"
        tree.mkdir()
        # The tests read ../shared/data from the checkout's parent.
        (Path(temporary) / "shared").symlink_to((ROOT.parent / "shared").resolve())
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        imaging = tree / "dicom_io" / "imaging.py"
        text = imaging.read_text()
        if SHIPPED_WINDOW not in text:
            print(f"{SHIPPED_WINDOW!r} is not in dicom_io/imaging.py: update this script")
            return 2
        imaging.write_text(text.replace(SHIPPED_WINDOW, SOFT_TISSUE_WINDOW))
        # The copy's modules come first (the working directory leads sys.path under -m); checked, not assumed.
        where = subprocess.run([sys.executable, "-c", "import dicom_io.imaging as m; print(m.LUNG_WINDOW, m.__file__)"],
                               cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
        print(f"mutated: {where}")
        if str(tree) not in where:
            print("the copy's dicom_io is not the one imported")
            return 2
        completed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                                    *test_files], cwd=tree, capture_output=True, text=True)
        failed = re.findall(r"^FAILED (\S+)", completed.stdout, flags=re.M)
        print(completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else completed.stderr[-2000:])
        for name in failed:
            print(f"  fails with the window swapped: {name}")
    return 0 if failed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    model = sub.add_parser("model", help="shuffle one layer of a shipped model copy; its card test must fail")
    model.add_argument("--task", default="brain-tumor", choices=["brain-tumor", "covid-ct"])
    model.add_argument("--layer", help="the layer to shuffle (default: the last one with a kernel)")
    model.add_argument("--seed", type=int, default=0)
    window = sub.add_parser("ct-window", help="swap the CT window in a copy of the checkout; a test must fail")
    window.add_argument("tests", nargs="*", default=["tests/test_imaging.py"])
    args = parser.parse_args()
    if args.check == "model":
        return check_model(args.task, args.layer, args.seed)
    return check_ct_window(args.tests)


if __name__ == "__main__":
    sys.exit(main())
