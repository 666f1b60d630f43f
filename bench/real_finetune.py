"""Fine-tune a shipped model on real scanner series as well as its curated set, and compare it with the shipped one
side by side: the curated evaluation splits and every labelled DICOM tree, through the worker's own path.

    .venv/bin/python bench/real_finetune.py covid-ct --pool /work/real-train --pool-labels POOL.tsv \\
        --eval ../shared/data/real-dicom-dev bench/real-dicom-dev.labels.tsv --eval /work/extra-dicom EXTRA.tsv \\
        --work /tmp/ft-covid [--epochs 12 --learning-rate 2e-4] [--candidate DIR]

Steps, each a ``dicom-triage`` command so the benchmark runs what an admin would run:

1. ``dataset from-dicom`` exports the pool (the worker's preprocessing, one split per patient) into WORK/pool;
2. ``train TASK --data CURATED --data WORK/pool --recipe SHIPPED --init-from SHIPPED`` (the curated set first, so
   its own split is drawn exactly as the shipped model's was and its holdout stays unseen);
3. ``calibrate`` on the same --data folders (temperature, threshold, feature domain);
4. ``evaluate`` of the shipped model and the candidate on the curated splits and on each ``--eval`` tree.

``--candidate DIR`` skips 1-3 and compares an existing model folder. The pool and the eval trees must not share a
patient: the pool trains, the trees judge.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.inference import default_model_dir  # noqa: E402

CURATED = {"covid-ct": ROOT.parent / "shared" / "data" / "covid-ct",
           "brain-tumor": ROOT.parent / "shared" / "data" / "brain-tumor-mri"}


def run(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    print("$ dicom-triage " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"dicom-triage {args[0]} failed with status {done.returncode}")
    return time.perf_counter() - started


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(CURATED))
    parser.add_argument("--pool", type=Path, help="labelled tree of real DICOM series to train on")
    parser.add_argument("--pool-labels", type=Path)
    parser.add_argument("--eval", nargs=2, action="append", default=[], metavar=("DIR", "LABELS"),
                        help="labelled DICOM tree to judge on (repeatable)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--candidate", type=Path, help="compare this model folder instead of training one")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--extra-train-args", default="", help="more train options, space-separated")
    args = parser.parse_args()

    env = {**os.environ, "DICOM_TRIAGE_PSEUDONYM_KEY": os.environ.get("DICOM_TRIAGE_PSEUDONYM_KEY")
           or secrets.token_hex(16)}
    shipped = default_model_dir(args.task)
    curated = CURATED[args.task]
    args.work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    candidate = args.candidate
    if candidate is None:
        if args.pool is None:
            parser.error("give --pool (and --pool-labels) to train, or --candidate to compare")
        pool = args.work / "pool"
        if not pool.exists():
            labels = ["--labels", str(args.pool_labels)] if args.pool_labels else []
            seconds["export"] = run(["dataset", "from-dicom", "--task", args.task, "--dicom", str(args.pool),
                                     *labels, "--out", str(pool), "--data-dir", str(args.work / "data")], env)
        candidate = args.work / "model"
        data = ["--data", str(curated), "--data", str(pool)]
        seconds["train"] = run(["train", args.task, *data, "--out", str(candidate), "--recipe", str(shipped),
                                "--init-from", str(shipped), "--epochs", str(args.epochs), "--learning-rate",
                                str(args.learning_rate), "--warmup-epochs", "1", "--time-budget", "0",
                                *args.extra_train_args.split()], env)
        seconds["calibrate"] = run(["calibrate", args.task, *data, "--model", str(candidate)], env)

    rows = []
    for name, model in (("shipped", shipped), ("candidate", candidate)):
        out = args.work / f"eval-{name}"
        out.mkdir(exist_ok=True)
        run(["evaluate", args.task, "--data", str(curated), "--model", str(model), "--json", str(out / "curated.json")],
            env)
        curated_figures = json.loads((out / "curated.json").read_text())
        row = {"model": name, **{split: curated_figures[split]["accuracy"]
                                 for split in ("testing", "testing_dedup", "holdout") if split in curated_figures}}
        for number, (tree, labels) in enumerate(args.eval):
            target = out / f"dicom-{number}.json"
            run(["evaluate", args.task, "--dicom", tree, "--labels", labels, "--model", str(model),
                 "--json", str(target)], env)
            row[Path(tree).name] = json.loads(target.read_text())["series"]
        rows.append(row)

    print(f"\n== {args.task}: shipped {shipped} against candidate {candidate}")
    for split in ("testing", "testing_dedup", "holdout"):
        if split in rows[0]:
            print(f"curated {split:<14} " + "  ".join(f"{r['model']} {pct(r.get(split))}" for r in rows))
    print(f"{'tree':<18} {'model':<10} {'n':>4} {'accuracy':>9} {'coverage':>9} {'sens':>7} {'spec':>7} {'AUC':>6} "
          f"{'worst neg':>9} {'OOD ok':>8}")
    for tree, _ in args.eval:
        for r in rows:
            f = r[Path(tree).name]
            auc = "-" if f["roc_auc"] is None else f"{f['roc_auc']:.3f}"
            worst = "-" if f["max_negative_suspicion"] is None else f"{f['max_negative_suspicion']:.2f}"
            print(f"{Path(tree).name:<18} {r['model']:<10} {f['n']:>4} {pct(f['accuracy']):>9} "
                  f"{pct(f['coverage']):>9} {pct(f['sensitivity']):>7} {pct(f['specificity']):>7} {auc:>6} "
                  f"{worst:>9} {pct(f['out_of_domain_handled']):>8}")
    if seconds:
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    (args.work / "comparison.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
