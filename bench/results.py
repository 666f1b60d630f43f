"""Regenerate docs/results.md: the study's table beside our reproduction, our shipped models, CPU speed.

Runs on this machine's CPU (TensorFlow): evaluates the shipped models on the original image files with the
production ``evaluate`` code, runs the black-pixel threshold baseline (no gradient training, seconds), and times
inference and a short training run. Rows that need long training are read from ``--runs`` (docs/training-runs.json:
bench/train_gpu.py's ``results.json`` entries, and CPU runs recorded from their cards) when given, else marked as
not run.

    .venv/bin/python bench/results.py --data ../shared/data [--runs docs/training-runs.json] [--update-cards]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.architectures import build_model
from models.card import ModelCard
from models.inference import Classifier, default_model_dir
from models.preprocessing import prepare_batch
from models.tasks import BRAIN_TUMOR, COVID_CT, get_task
from training.device import cpu_model
from training.evaluate import run_evaluate
from training.fit import TrainConfig, build_trainable, compile_for_training, one_hot
from worker.cli import main as cli_main

DATA_FOLDERS = {"brain-tumor": "brain-tumor-mri", "covid-ct": "covid-ct"}

#: The study's table: (key, dataset, method, study accuracy %, architecture, task, split we compare).
STUDY_ROWS = [
    ("study_brain", "brain-tumor MRI", "CNN from scratch, 64x64x3 (`study-brain-cnn`)", 94.13, "testing"),
    ("resnet50_brain", "brain-tumor MRI", "ResNet50, ImageNet weights, fine-tuned (`resnet50`)", 96.11, "testing"),
    ("study_covid", "COVID lung CT", "CNN from scratch, 256x256x1 (`study-covid-cnn`)", 95.60, "holdout"),
    ("threshold_covid", "COVID lung CT", "black-pixel thresholding, 120, nearest class mean (`threshold`)", 65.5,
     "holdout"),
    ("brain_cnn_on_covid", "COVID lung CT", "the brain CNN's architecture", 78.64, "holdout"),
    ("covid_cnn_on_brain", "brain-tumor MRI", "the COVID CNN's architecture", 88.00, "testing"),
]


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def threshold_baseline(data: Path, work: Path) -> dict[str, Any]:
    out = work / "threshold-covid"
    code = cli_main(["train", "covid-ct", "--data", str(data / DATA_FOLDERS["covid-ct"]), "--arch", "threshold",
                     "--out", str(out), "--cv", "5"])
    if code != 0:
        raise SystemExit(f"threshold baseline failed with exit code {code}")
    return ModelCard.load(out).metrics


def inference_speed(task: str, batches: int = 10, batch_size: int = 32) -> dict[str, float]:
    """Images/s at ``batch_size`` on this CPU: the model alone, and end-to-end from display images."""
    classifier = Classifier.load(default_model_dir(task))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(batch_size)]
    prepared = prepare_batch(images, classifier.card.input_spec)
    classifier.predict(images, batch_size)  # warm-up: graph tracing
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict_prepared(prepared)
    model_only = batches * batch_size / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict(images, batch_size)
    end_to_end = batches * batch_size / (time.perf_counter() - started)
    return {"model_images_per_s": model_only, "end_to_end_images_per_s": end_to_end}


def training_epoch_cost(task: str, train_images: int, steps: int = 6) -> dict[str, float]:
    """CPU and wall seconds per training epoch of the shipped architecture, from a short run of ``steps``."""
    card = ModelCard.load(default_model_dir(task))
    spec = card.input_spec
    config = TrainConfig(**{k: v for k, v in card.training["config"].items() if k != "augmentation"})
    model, _ = build_trainable(lambda: build_model(card.architecture, get_task(task), spec), config)
    steps_per_epoch = int(np.ceil(train_images / config.batch_size))
    trainable = compile_for_training(model, config, steps_per_epoch)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (config.batch_size * steps, *spec.shape)).astype(np.float32)
    y = one_hot(rng.integers(0, model.output_shape[-1], len(x)), model.output_shape[-1])
    trainable.fit(x[:config.batch_size * 2], y[:config.batch_size * 2], batch_size=config.batch_size, verbose=0)
    cpu, wall = time.process_time(), time.perf_counter()
    trainable.fit(x, y, batch_size=config.batch_size, verbose=0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s_per_epoch": cpu / steps * steps_per_epoch, "wall_s_per_epoch": wall / steps * steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, "epochs_run": card.training.get("epochs_run")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding brain-tumor-mri/ and covid-ct/")
    parser.add_argument("--work", type=Path, default=Path("artifacts/results"))
    parser.add_argument("--runs", type=Path, help="training runs by row key (docs/training-runs.json)")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--update-cards", action="store_true",
                        help="write the CPU evaluation of the original files into the shipped cards' metrics")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    evaluations: dict[str, dict[str, Any]] = {}
    for task in (BRAIN_TUMOR.name, COVID_CT.name):
        report = args.work / f"evaluate-{task}.json"
        run_evaluate(get_task(task), args.data / DATA_FOLDERS[task], None, report, args.work, 32)
        evaluations[task] = json.loads(report.read_text())
        if args.update_cards:
            card = ModelCard.load(default_model_dir(task))
            for split, metrics in evaluations[task].items():
                if isinstance(metrics, dict) and "accuracy" in metrics and split != "cv5":
                    card.metrics[split] = {k: v for k, v in metrics.items() if k != "class_names"}
            card.save(default_model_dir(task))
    threshold = threshold_baseline(args.data, args.work)
    gpu = json.loads(args.runs.read_text()) if args.runs else {}
    speed = {task: inference_speed(task) for task in (BRAIN_TUMOR.name, COVID_CT.name)}
    epoch = {BRAIN_TUMOR.name: training_epoch_cost(BRAIN_TUMOR.name, 4852),
             COVID_CT.name: training_epoch_cost(COVID_CT.name, 1736)}
    load = os.getloadavg()[0]
    args.out.write_text(render(evaluations, threshold, gpu, speed, epoch, load), encoding="utf-8")
    print(f"wrote {args.out}")


def render(evaluations, threshold, gpu, speed, epoch, load) -> str:
    brain, covid = evaluations["brain-tumor"], evaluations["covid-ct"]
    brain_card, covid_card = (ModelCard.load(default_model_dir(t)) for t in ("brain-tumor", "covid-ct"))
    lines = ["# Results", "",
             "Generated by `bench/results.py` (do not edit by hand). Accuracies of shipped models are from "
             "`dicom-triage evaluate` on the original image files (TensorFlow, CPU).", "",
             "## The study's table and our reproduction", "",
             "| dataset | method | study | ours | note |", "|---|---|---:|---:|---|"]
    for key, dataset, method, study, split in STUDY_ROWS:
        if key == "threshold_covid":
            ours = f"{pct(threshold['holdout']['accuracy'])} (cv5 {pct(threshold['cv5']['accuracy'])})"
            note = "our seeded, duplicate-aware 70/20/10 split; class means of the black-pixel fraction"
        elif key in gpu and "metrics" in gpu[key]:
            run = gpu[key]
            ours = pct(run["metrics"].get(split, {}).get("accuracy"))
            note = (f"{run.get('where', 'GPU (bench/train_gpu.py)')}, {run['epochs_run']} epochs in "
                    f"{run.get('gpu_seconds', run.get('seconds', 0)):.0f} s, ReduceLROnPlateau; inputs: "
                    f"{run.get('data', 'prepared here')}")
        else:
            ours, note = "not run", NOT_RUN.get(key, "GPU time spent on the shipped models; see below")
        lines.append(f"| {dataset} | {method} | {study:.2f}% | {ours} | {note} |")
    lines += ["", "## Our shipped models (`triage-cnn`)", "",
              "| task | split | n | accuracy | target | macro F1 | ROC AUC |", "|---|---|---:|---:|---:|---:|---:|"]
    targets = {"testing": "98.5%", "testing_dedup": "98.0%", "holdout": "98.0%", "cv5": "97.5% mean"}
    for task, results in (("brain-tumor", brain), ("covid-ct", covid)):
        for split in ("testing", "testing_dedup", "holdout"):
            if split in results:
                m = results[split]
                lines.append(f"| {task} | {split} | {m['n']} | {pct(m['accuracy'])} | {targets[split]} | "
                             f"{m['macro_f1']:.4f} | {m['roc_auc']:.4f} |")
        if "cv5" in results:
            cv = results["cv5"]
            lines.append(f"| {task} | cv5 (5 group-aware folds) | all | {pct(cv['accuracy'])} ± {pct(cv['std'])} | "
                         f"{targets['cv5']} | – | – |")
    lines += ["", "Model UIDs: brain-tumor `" + brain_card.uid + "`, covid-ct `" + covid_card.uid + "`.", ""]
    lines += real_dicom_table(brain_card, covid_card)
    lines += ["",
              "## Speed on this machine's CPU (2 cores, shared)", "",
              f"CPU: {cpu_model()}, {os.cpu_count()} cores. Load average when measured: {load:.1f} (other engineers' "
              "jobs share the cores). Sessions land on different processors and hosts (a COVID training epoch took "
              "~20 s on the AMD EPYC with AVX-512 BF16 of 2026-11-27 and 75-95 s on the AMD EPYC hosts of the two "
              "sessions before), so compare figures within one run.", "",
              "| task | input | inference, model only (img/s, batch 32) | inference, end to end from display images "
              "| training CPU s / epoch | training wall s / epoch | epochs the shipped run used "
              "| the shipped run on this CPU (min, estimated from a few steps unless measured; target 60) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for task, card in (("brain-tumor", brain_card), ("covid-ct", covid_card)):
        s, e = speed[task], epoch[task]
        spec = card.input_spec
        # A model trained on a CPU shows its own training time rather than the estimate from a few steps on random
        # inputs (no validation, no input pipeline: it missed the COVID run's 19.9 s per epoch by a fifth either way).
        trained_here = str(card.training.get("trained_on", "")).startswith("CPU")
        minutes = (f"{card.training['train_wall_seconds'] / 60:.0f} (measured)" if trained_here
                   else f"{e['wall_s_per_epoch'] * (e['epochs_run'] or 0) / 60:.0f}")
        lines.append(f"| {task} | {spec.height}x{spec.width}x{spec.channels} | {s['model_images_per_s']:.0f} | "
                     f"{s['end_to_end_images_per_s']:.0f} | {e['cpu_s_per_epoch']:.0f} | {e['wall_s_per_epoch']:.0f} | "
                     f"{e['epochs_run']} | {minutes} |")
    lines += ["", REAL_NOTES, "", NOTES]
    return "\n".join(lines) + "\n"


#: The series-level targets on real scanner DICOM (issue 17), by task.
REAL_TARGETS = {
    "covid-ct": "ROC AUC >= 0.95; sensitivity and specificity >= 90%; no pre-2020 chest above 0.8",
    "brain-tumor": "tumour vs none >= 90% right; no healthy series above 0.8",
}


def real_dicom_table(*cards: ModelCard) -> list[str]:
    """The cards' series-level splits on real DICOM (``external``: ../shared/data/real-dicom-dev; ``external_extra``:
    the 143-series collection of docs/real-dicom-sources.md), written by ``evaluate --dicom --record-split``."""
    lines = ["## Real scanner DICOM, per series, through the worker's path", "",
             "`dicom-triage evaluate TASK --dicom DIR --labels FILE --record-split SPLIT`; `external` is "
             "`../shared/data/real-dicom-dev` (`bench/real-dicom-dev.labels.tsv`), `external_extra` the collection "
             "in `docs/real-dicom-sources.md` (not in CI). Sensitivity, specificity and AUC are over the series given "
             "a class; coverage is that share; *finding* is finding against no finding.", "",
             "| task | split | series | accuracy (class) | coverage | finding right | sensitivity | specificity "
             "| ROC AUC | most suspicious negative | out of domain refused | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for card in cards:
        for split in ("external", "external_extra"):
            m = card.metrics.get(split)
            if not m:
                continue
            auc = "–" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
            worst = "–" if m.get("max_negative_suspicion") is None else f"{m['max_negative_suspicion']:.2f}"
            lines.append(f"| {card.task} | {split} | {m['n']} | {pct(m['accuracy'])} | {pct(m['coverage'])} | "
                         f"{pct(m['finding_accuracy'])} | {pct(m['sensitivity'])} | {pct(m['specificity'])} | {auc} | "
                         f"{worst} | {pct(m['out_of_domain_handled'])} of {m['out_of_domain_n']} | "
                         f"{REAL_TARGETS[card.task]} |")
    return lines


NOT_RUN = {
    "resnet50_brain": "not run: no ImageNet weights here (Keras' cache is empty, and the hosts that serve them, "
                      "storage.googleapis.com and huggingface.co, do not resolve from these machines); "
                      "`--weights imagenet` would train from scratch and say so",
}

REAL_NOTES = """## Real scanner DICOM: what the worker does with it, how it was chosen, where it still fails

- **The bridge** (`models.regions`, `models.series`; issue 17). The training images are tight crops of 8-bit
  display images; a scanner frame is the whole field of view. CT frames are displayed in the window that maps real
  chest CT onto the training PNGs' grey levels (`bench/real_dicom.py --window`: lung -865 HU and soft tissue 42 HU
  onto grey 83 and 231 of 300 non-COVID PNGs: W 1563 / L -592, shipped as W 1560 / L -590; the textbook lung window
  W 1500 / L -600 moved one series either way on the 143-series collection), then cut to the lungs: the body
  (largest region above -500 HU, holes filled; table and air left out), the lungs inside it (below -400 HU), the
  box widened to the same chest-wall distance on both sides so that a consolidated lung stays in, and the PNGs'
  median margins (3-5% left and right, 6% top and bottom). MR frames are cut to the head (log-Otsu tissue level)
  with the brain JPEGs' median margins (12% left and right, 8% top, 1% bottom); against 4% margins these lowered
  every real series' median feature distance to the training images (19 brain series: e.g. 28.4 -> 22.3). A slice
  is left out, with its reason, when it shows no body, too little lung (under 10% of the body), no head, noise
  only, tissue filling its box (a limb), or when its penultimate features lie farther from the training images than
  99.5% of the validation images (Mahalanobis, `models.domain`). A series with under 25% of its slices left is
  `indeterminate`; so are CT without Hounsfield rescale and frames with no air, while a MONOCHROME1 CT is read
  from its Hounsfield units like any other (tested in `tests/test_bad_series.py`). Routing refuses scouts by Image
  Type or description and diffusion maps.
- **Aggregation, chosen on real series.** COVID: the median slice by suspicion (the old mean of the top quarter
  called the 2007 lung-cancer series of the development set COVID at 0.77-0.84, new or old window, from its apex
  and mass slices; its median lung slice says 0.01). Brain: the slice at the 75% quantile, so a finding needs a
  quarter of the slices: healthy volunteers' volumes have 3-16% of their slices above 0.5 on their own, and the
  top-quarter mean called all three healthy development volumes glioma (0.88-0.96). Over the 17 real brain series
  read (quantiles 0.5 to 0.9 tried), 0.75 puts 5 of 6 healthy series at or below 0.26 and 6 of 7 glioma volumes
  at or above 0.96 (the RIDER vertex pairs, no lesion visible, stay at 0.01-0.04 at every quantile); 0.8 lifts a
  healthy DTI volume to 0.77, and the median drops five glioma volumes below 0.5.
- **Cost.** Finding the region takes about 5.4 ms per 512x512 CT frame and 1.6 ms per 128x128 MR frame (masks on
  the frame shrunk to 256 pixels a side; 12.5 ms at full size); the feature distance and the temperature come out
  of the same model call and cost 2% of it (same process, batch 32: brain 842 against 863 img/s, COVID 378
  against 383).
- **Calibration** (`dicom-triage calibrate`). Temperature on the validation split: COVID T 0.558 (NLL 0.123 ->
  0.089, ECE 0.058 -> 0.013), brain T 0.644 (NLL 0.132 -> 0.087, ECE 0.069 -> 0.007); both models were
  under-confident (label smoothing). The operating threshold is 0.5 on calibrated suspicion: Youden's J on the
  curated validation split is flat and its maximum fell at 0.066 for the brain model.
- **Side by side** (`.venv/bin/python bench/real_dicom.py --dicom ../shared/data/real-dicom-dev --labels
  bench/real-dicom-dev.labels.tsv --dicom /work/extra-dicom --labels LABELS`; *before* = whole frames, raw
  probabilities, top-quarter mean, argmax, in the new window). Development set: COVID accuracy 80% -> 100%,
  specificity 0 -> 100%, AUC 0.50 -> 1.00, abdomen slices refused 0/2 -> 2/2; brain: healthy volumes called
  healthy 0/3 -> 3/3 (suspicion 0.88-0.96 -> 0.04-0.08), the two lateral slices through the ear glioma 0.96 ->
  indeterminate. The 143-series collection: COVID accuracy 23.7% -> 57.9%, specificity 20.3% -> 64.5%, AUC 0.580 ->
  0.823, sensitivity 80% -> 100% (4 of 4 classified; the sagittal reformat is indeterminate), out-of-domain refused
  36.8% -> 98.2%; brain finding right 70% -> 80%, specificity 0 -> 67%, out-of-domain refused 91.2% -> 98.2%.
- **Where it still fails** (the model, not the bridge). Multi-slice chest CT is right in 7 of 8 classified
  non-COVID series (two PET/CT series say BodyPartExamined BREAST and are not applicable) and 4 of 4 COVID series;
  the miss is a community-acquired pneumonia (COVID-CT-MD `cap001`, called COVID 0.90). Of the 62 single slices from
  pre-2020 patients (most of them TCGA lung cancer, contrast-enhanced, many with effusions, consolidation or
  fibrosis) 34 are called non-COVID, 7 indeterminate and 21 COVID, 12 of those above 0.9: the SARS-CoV-2 CT set's
  non-COVID class holds few abnormal lungs, so the model calls abnormal lung COVID. The development targets are met (AUC 1.0, sensitivity and specificity
  100%, the pre-2020 series at 0.01), the collection's are not (AUC 0.82, specificity 65%, negatives up to 0.99).
  Brain: tumour against none is right for the healthy volumes (5 of 6; the miss is a 3-year-old's sagittal MPRAGE)
  and 6 of 7 glioma volumes are called a tumour, but the type is wrong in all 7 (REMBRANDT FLAIR -> meningioma,
  CPTAC/Brain-Tumor-Progression T1 -> pituitary): the training set's gliomas are T1 post-contrast slices of another
  population. The development set's RIDER slices lie near the vertex with no visible lesion (its manifest) and come
  out notumor. Closing both needs training data with abnormal non-COVID lungs and real tumour series (the retraining
  issue's confirmed studies; sources worth adding to `../shared` are in `docs/real-dicom-sources.md`), not a new
  bridge.
- **Fine-tuning on real series, tried and not shipped** (session 14; `bench/real_finetune.py`, every figure in
  `docs/training-runs.json` `real_series_finetune_experiments`). `dataset from-dicom` exports labelled real series
  through the worker's preprocessing; `train --init-from --recipe` fine-tunes beside the curated set, whose split
  stays the shipped model's; `--interpolate 0.5` keeps half of the shipped weights. COVID, two patient folds of the
  extra collection (each fine-tune saw the 16-patient pool and one fold; judged on the other): specificity 61% -> 78%
  and 68% -> 74%, curated holdout 95.56% kept, but pooled AUC 0.823 -> 0.806, one of four COVID series lost
  (COVID-CT-MD P001 0.69 -> 0.41) and 13 of 67 negatives still above 0.8: the threshold moves, the ranking does
  not. Without interpolation the curated holdout falls (91.9% at lr 2e-4, 94.8% at 5e-5). Brain (21 subjects:
  glioblastoma T1 post-contrast, volunteers' EPI/DTI): interpolated, curated 98.86/98.55 and nothing changes on
  real series; not interpolated, two of seven glioma types right, but curated 98.17/97.95 (below the floors) and
  two phantoms let through. The reachable repositories held two COVID-positive patients and one glioma collection
  in one sequence: the data, not the recipe, is what is missing.
"""

NOTES = """## How the shipped models were trained, why they still miss their targets, and how to rerun

- **Recipe.** `triage-cnn` (a small ResNet, BatchNormalization momentum 0.9), Adam with a 3-epoch warm-up then
  cosine decay from 1e-3 to 1e-5 (`--lr-schedule cosine`), label smoothing 0.1, balanced class weights, the default
  augmentation, an exponential moving average of the weights (`--ema 0.999`) by which the best-val_loss epoch is
  chosen and saved. The earlier ReduceLROnPlateau runs cut the rate on noise: validation accuracy swings by tens of
  points between epochs while the rate is high, and only a schedule that decays regardless ends on stable weights
  (brain-tumor went from 93.14% to 98.40% on `testing` with this change alone).
- **Brain-tumor** (shipped: 128x128, trained here on the CPU in 54.9 minutes; `shipped_brain_tumor_cpu_128_budget_run`).
  `dicom-triage train brain-tumor --data ../shared/data/brain-tumor-mri --out DIR --recipe models/weights/brain-tumor
  --epochs 300 --time-budget 55 --input-size 128x128x1`: the recipe above, seed 2, under a 55-minute wall-clock
  budget (after each epoch the run plans how many more fit and ends its cosine decay in the last of them). It fitted
  174 epochs (median 19.2 s each) and kept the best val_loss epoch's averaged weights (epoch 85): 98.78% on `testing`
  and 98.55% on `testing_dedup`, both targets met, within the 60-minute training target. It replaces a 160x160 model
  trained for 200 epochs on a GPU (98.70%/98.31%, `brain_tumor_160_gpu_200_epoch_run`), whose recipe takes 2-4.4
  hours on this CPU. Three recipes fit 60 CPU minutes, and the shipped one is the one with the lowest validation
  loss (0.398): the same recipe at 160x160 cut to 45 fixed epochs (`--epochs 45`: 96.41%/96.50%, val_loss 0.457,
  `brain_tumor_cpu_45_epoch_run`) and at 160x160 under the same budget (96 epochs of a median 38.7 s: 97.56%/97.22%,
  val_loss 0.412, `brain_tumor_cpu_55_minute_budget_run`). At 160 the budget held too few epochs: that run reached
  99.9% training accuracy but 96-97% on validation. Earlier GPU runs: at 128x128 without EMA, 98.40%/97.71% after
  200 epochs; at 160 with EMA, two seeds both 98.70% on `testing`.
- **COVID CT** (shipped: 192x192, trained here on the CPU in 55 minutes; `covid_ct_cpu_192_budget_run`).
  `dicom-triage train covid-ct --data ../shared/data/covid-ct --out DIR --recipe models/weights/covid-ct
  --input-size 192x192 --time-budget 55 --epochs 300`: the recipe above without EMA, seed 1, split seed 0, under a
  55-minute budget. It fitted 186 epochs (13-21 s each) and kept the best val_loss epoch (153): 95.56% on the
  holdout (11 errors, ROC AUC 0.989) and 97.59% on validation, against 95.16% (12 errors, AUC 0.981) and 94.16%
  for the 160x160 GPU model it replaces (140 epochs on JPEG copies). Its validation loss, 0.2616, is the lowest of
  any COVID run; on the holdout it gains one image, within that split's noise, on validation (497 slices) 17.
  The same command with seed 2 (`covid_ct_cpu_192_budget_seed2_run`, 179 epochs) scored 95.16% on the
  holdout and 94.57% on validation (val_loss 0.2882): the seed moves validation by 3 points, so most of seed 1's
  lead there is its seed; what the new model surely changes is where and how fast it was trained.
  The card's cv5 is the 192 recipe's full-length folds on the GPU: 92.42% ± 1.24 (91.0, 93.8, 92.9, 90.9, 93.5;
  `covid_ct_192_cv5_run`: 150 epochs with EMA, on WebP copies); this recipe's own 5 folds take 5 x 55 CPU minutes
  and have not been run. What else was tried on this CPU, all on the same holdout: the previous 160 recipe, 93.55%
  in 49 minutes (val_loss 0.2778, `covid_ct_cpu_recipe_run`); with stronger augmentation in bfloat16, 93.15%
  (`covid_ct_cpu_strong_augmentation_run`); with `--pool-validation-fraction 0.1` (2,009 training slices instead of
  1,736), 93.95% (`covid_ct_cpu_pool_validation_run`); 224x224 under a 55-minute budget, 86 epochs of 40 s, 91.53%
  (val_loss 0.421, `covid_ct_cpu_224_budget_run`); 128x128 under a 30-minute budget, 122 epochs, 93.15%
  (`covid_ct_cpu_128_30_minute_budget_run`). At a fixed time 224 holds too few epochs and 128 too little detail;
  192 lies between. Averaging the 160 and 192 models' probabilities scored 95.16% on the holdout and 96.38% on
  validation, the two 192 seeds' 95.16% and 96.58%: below the shipped model alone; flipping the slices at test
  time changed nothing (the 160 model: 95.16% either way).
  Both seeds end at about 99% training accuracy and 94.6-97.6% on validation: the model still overfits the
  training slices; next is more data from other patients (the retraining issue's confirmed studies). The
  duplicate-aware split changes little on this set: of its 2,481 slices only 10 have a near-duplicate (dHash within
  10 bits; the median nearest neighbour is 49 bits away), so the holdout is in effect a stratified random 10%,
  drawn as the study drew its own. On 248 images one image is 0.40 points and the binomial standard error is 1.3
  points: the shipped model's 95.56% (237 of 248) and the study's 95.60% are the same figure within that noise; two
  runs of one recipe differed by 1.6 points.
- **Where the COVID errors are.** `dicom-triage evaluate covid-ct --data ../shared/data/covid-ct --errors` lists the
  shipped model's 11 holdout errors; 8 of them are also errors of the 160 model before it, and its 4 COVID-labelled
  ones (`Covid (648)`, `(654)`, `(1205)`, `(1208)`) lie in the two runs named below. The 160 model's 12 holdout
  errors were not spread over the set either: 6 of the 7 COVID-labelled ones fall in two runs of nearby file numbers
  (`Covid (644-654)`, `Covid (1163-1208)`), and the same runs hold 11 of that model's 29 validation errors (`Covid
  (638-684)`, `Covid (1191-1225)`); over both splits, 33 of the 41 errors fall in 8 such runs. The dataset numbers
  each patient's slices consecutively, as far as its ordering shows (it has no patient IDs), so these are a few
  patients. Viewed side by side (18 of the 19 COVID-labelled errors, 9 of the 22 non-COVID ones; an engineer's look,
  not a radiologist's reading), the COVID-labelled slices show clear lung fields, unlike `Covid (400)` and `Covid
  (700)`, which the model gets right and which show peripheral ground-glass opacities; the non-COVID slices it calls
  COVID are clear slices too. The label is the patient's diagnosis, not the slice's finding: a slice with no visible
  finding carries no sign of its class. Part of the distance to the 98% target is therefore in the labels.
  A model could close it only by recognising the patients, whose other slices the random split puts in training.
- **Where.** One H100 (Keras 3.15.1 on JAX, `bench/train_gpu.py`). The second run (brain 160, COVID 192, the
  folds) ran as six training processes sharing the GPU at once, 7.5 minutes in all; alone, an epoch takes about
  0.6 s (brain 128) and 0.3 s (COVID 160). The inputs travelled as lossy copies of `prepare_batch` output (all had
  to fit one 64 MiB transfer: JPEG 88 in the first run, WebP 85/90 in the second); the table above scores the
  shipped models on the original files here, on TensorFlow. `docs/training-runs.json` holds every run.
- **Study rows.** `study-brain-cnn` ran 30 epochs in a 25 s GPU budget, on inputs resized on the device from the
  carried 128x128 to 64x64. `study-covid-cnn` ran here on the CPU at its own 256x256x1 from the original files
  (`dicom-triage train covid-ct --arch study-covid-cnn`, train's defaults, 60 epochs, 46 minutes): 95.56%, the
  study's 95.60% within one image; it scores the shipped triage-cnn's 237 of 248 on the holdout and less on
  validation (93.56% against 97.59%), has no cv5, and is not shipped. Its first run, on the GPU from 160x160 inputs
  resized up (92.34%), is `study_covid_gpu_160_run`. The two cross rows ran here on the CPU (`dicom-triage train`,
  20 and 15 epochs; commands in `docs/training-runs.json`).
- **Rerun.** Prepare here: `.venv/bin/python bench/train_gpu_data.py --data ../shared/data --out .gpu/k --codec webp
  --quality 85 --size brain-tumor=160` (and `--quality 90 --size covid-ct=192`, or `--size covid-ct=160` for the
  shipped COVID recipe) and the wheels (keras 3.15.1, namex, optree for cp312) into `.whl/`; one device call with
  carry `[".gpu/k", ".whl"]`, after installing the wheels into a PYTHONPATH folder (the command in the device tool's
  README): `KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/train_gpu.py --data .gpu/k --out
  $OUT --epochs 200 --lr-schedule cosine --label-smoothing 0.1 --patience 1000 --ema 0.999
  --job brain=brain-tumor:triage-cnn:160:ship:seed2` (several such processes can share the GPU; CV folds split
  across them with `:cv5:cvonly:foldsA-B`); copy `$OUT/brain` into `models/weights/brain-tumor` and run this script
  with `--update-cards`.
- **Duplicates.** 483 of the 1,311 brain `Testing` images are exact (216) or near (dHash-256 within 10 bits)
  copies of `Training` images, including 369 of the 405 `notumor` test images; `testing_dedup` leaves them out.
"""


if __name__ == "__main__":
    main()
