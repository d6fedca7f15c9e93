"""A ready-made training run for a lent GPU machine: pack here, run there, bring back the model and its benchmark.

The machine receives only the working tree (at most 64 MiB with what is carried) and has no ``../shared``. So:

  here:   python tools/gpu_train.py pack [--budget-mb 48] [--train-limit N] [--val-limit N]
          (the OpenKBP validation split whole, then training patients until the budget: .gpu_pack/, git-ignored)
          python tools/gpu_train.py wheels     (MONAI and SimpleITK for the machine's Python 3.12: .gpu_wheels/)
  there, two calls back to back (the machine keeps what the first left while it stays warm; SimpleITK's wheel
  alone is 53 MB, so wheels and data cannot travel in one call):
          call 1, carry .gpu_wheels:  python3 -m pip install --no-deps --target /tmp/doseai-site .gpu_wheels/*.whl
          call 2, carry .gpu_pack:    (nothing to run: the data waits there)
          call 3, carry .gpu_pack-1:  python3 tools/gpu_train.py run --site /tmp/doseai-site --pack .gpu_pack \
                                          --pack .gpu_pack-1 --out "$OUT" --minutes 7
  (``pack --part 1`` packs the training patients part 0 left out: 48 MB hold the 40 validation patients and 86
  training patients, a second part the other 114 in 42 MB.)

``run`` unpacks the data into a work folder, takes the Stage I prior out of the shipped weights, trains the
preference model on from the shipped weights with the shipped model's recipe (``--time-budget-min``: the epochs
are cut to the budget at the pace of the second epoch, the first carrying cudnn autotuning), exports it,
refits its calibration on training patients, and runs ``bench_preference.py`` on the packed validation patients
for the new model and for the shipped one on the same machine. Into ``--out`` go the weights and card, both
benchmark JSONs, the training log and the run's log (6 files: the device tool brings back at most 8). Ship the
new model only if its benchmark beats the shipped one's on all 40 validation patients (Docs/Training.md).

The same commands run on a CPU with a small budget (``--device cpu --minutes 1 --epochs 1``): the test
Testing/test_gpu_train.py does that on a tiny subset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PACK = REPO / ".gpu_pack"
WHEELS = REPO / ".gpu_wheels"
# what the machine's image lacks of what training imports (it has torch, numpy, scipy, tqdm, matplotlib)
MISSING_THERE = ("monai", "SimpleITK")
SHIPPED = REPO / "Resources" / "Models" / "dose_preference_v2_5.pt"
# the shipped model's Stage II recipe (its card: training.runs.stage_ii_v2_5), from its weights on
RECIPE = ("--refine-film", "--snap-to-case", "--slice-mm", "2.5", "--with-ct-less", "--metric-weight", "0.5",
          "--neutral-fraction", "0.6")


def part_folder(pack_folder: str, part: int) -> Path:
    """Part 0 is ``pack_folder`` itself, part K ``<pack_folder>-K``."""
    return Path(pack_folder) if part == 0 else Path(f"{pack_folder}-{part}")


def pack(args) -> int:
    from doseai.paths import openkbp_root
    from doseai.train.travel import pack_openkbp, packed_patients

    limits = {split: limit for split, limit in (("train", args.train_limit), ("validation", args.val_limit)) if limit}
    earlier = [part_folder(args.pack, k) for k in range(args.part)]
    manifest = pack_openkbp(Path(args.source or openkbp_root()), part_folder(args.pack, args.part),
                            int(args.budget_mb * 1e6), splits=("validation", "train") if args.part == 0 else ("train",),
                            limits=limits, exclude=packed_patients(earlier), whole_first=args.part == 0)
    for split, listing in manifest["splits"].items():
        print(f"{split}: {len(listing['packed'])} patients packed, {len(listing['left_out'])} left out")
    print(f"{manifest['packed_bytes'] / 1e6:.1f} MB in {part_folder(args.pack, args.part)} "
          f"(budget {args.budget_mb:g} MB)")
    return 0


def wheels(args) -> int:
    """Download (here, from the package registry) the wheels of :data:`MISSING_THERE` at the versions installed
    here, for the machine's CPython 3.12 on x86-64 Linux."""
    from importlib.metadata import version

    requirements = [f"{name}=={version(name)}" for name in MISSING_THERE]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--platform", "manylinux2014_x86_64", "-d", str(args.wheels), *requirements]
    return subprocess.run(command).returncode


def _step(log, command: list[str], env: dict) -> None:
    """Run one step (a ``doseai`` command or a script), its output into the run's log; stop on failure."""
    started = time.perf_counter()
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.write(f"[{time.perf_counter() - started:.1f} s, exit code {result.returncode}]\n")
    log.flush()
    if result.returncode != 0:
        raise SystemExit(f"gpu_train: step failed ({' '.join(command[:4])} ...): see {log.name}")


def run(args) -> int:
    if args.site:
        sys.path.insert(0, args.site)
    from doseai.train.travel import unpack_openkbp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="doseai-gpu-"))
    packs = args.pack or [str(PACK)]
    manifests = [unpack_openkbp(Path(folder), work / "data") for folder in packs]
    manifest = {"splits": {split: {"packed": [pid for m in manifests for pid in m["splits"].get(split, {})
                                              .get("packed", [])]} for split in ("validation", "train")}}
    paths = [str(REPO), *([args.site] if args.site else []), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "DOSEAI_DATA": str(work / "data"), "DOSEAI_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    doseai = [sys.executable, "-m", "doseai.cli"]
    weights, prior = out / f"{args.run}.pt", work / "prior.pt"
    limit = ["--limit", str(args.val_limit)] if args.val_limit else []
    with open(out / "run.log", "w") as log:
        log.write(json.dumps({"packed": {k: len(v["packed"]) for k, v in manifest["splits"].items()}}) + "\n")
        _step(log, doseai + ["train", "prior-from-weights", "--weights", str(SHIPPED), "--out", str(prior)], env)
        _step(log, doseai + ["train", "preference", "--run", args.run, "--prior", str(prior), "--init", str(SHIPPED),
                             *RECIPE, "--device", args.device, "--epochs", str(args.epochs), "--time-budget-min",
                             str(args.minutes), "--lr", str(args.lr), "--seed", str(args.seed)], env)
        _step(log, doseai + ["train", "export", "--checkpoint", str(work / "cache" / "runs" / args.run / "last.pt"),
                             "--prior", str(prior), "--out", str(weights), "--force"], env)
        _step(log, doseai + ["train", "calibrate-preference", "--weights", str(weights), "--mirror-neutral",
                             "--no-mirror-average", "--limit", str(args.calibration_limit)], env)
        bench = [sys.executable, str(REPO / "Testing" / "benchmarks" / "bench_preference.py")]
        _step(log, bench + ["--weights", str(weights), "--json", str(out / "bench.json"), *limit], env)
        _step(log, bench + ["--weights", str(SHIPPED), "--json", str(out / "bench_shipped.json"), *limit], env)
    shutil.copy(work / "cache" / "runs" / args.run / "log.jsonl", out / "train_log.jsonl")
    new, old = (json.loads((out / name).read_text()) for name in ("bench.json", "bench_shipped.json"))
    print(f"dose / DVH score: new {_scores(new)}, shipped {_scores(old)} ({len(manifest['splits']['validation']['packed'])}"
          f" validation patients); files in {out}")
    return 0


def _scores(bench: dict) -> str:
    return f"{bench['accuracy']['dose_score_gy']:.3f} / {bench['accuracy']['dvh_score_gy']:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_train.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="pack the OpenKBP data for the machine (here)")
    packing.add_argument("--source", help="the openkbp folder (default: ../shared/data/openkbp or $DOSEAI_DATA)")
    packing.add_argument("--pack", default=str(PACK), help="part 0's folder; part K goes to <pack>-K")
    packing.add_argument("--part", type=int, default=0,
                         help="0: validation, then training patients; K: the training patients parts 0..K-1 left out")
    packing.add_argument("--budget-mb", type=float, default=48.0,
                         help="MB for the data (the working tree is ~11 MB of the 64 MiB; default: %(default)s)")
    packing.add_argument("--train-limit", type=int, help="at most this many training patients")
    packing.add_argument("--val-limit", type=int, help="at most this many validation patients")
    getting = sub.add_parser("wheels", help="download the wheels the machine lacks (here)")
    getting.add_argument("--wheels", default=str(WHEELS))
    running = sub.add_parser("run", help="train, export, calibrate and benchmark (on the machine)")
    running.add_argument("--pack", action="append", help="a pack folder (repeat for every part; default: .gpu_pack)")
    running.add_argument("--out", default=os.environ.get("OUT", "gpu-run-out"), help="where the results go ($OUT)")
    running.add_argument("--work", help="work folder (default: a new temporary folder)")
    running.add_argument("--site", help="a folder of installed packages the steps import too (the wheels)")
    running.add_argument("--device", default="cuda")
    running.add_argument("--minutes", type=float, default=7.0, help="training time budget (default: %(default)s)")
    running.add_argument("--epochs", type=int, default=400, help="upper bound the budget cuts (default: %(default)s)")
    running.add_argument("--run", default="gpu_run", help="run name; the weights are <run>.pt")
    running.add_argument("--lr", type=float, default=2e-4)
    running.add_argument("--seed", type=int, default=11)
    running.add_argument("--calibration-limit", type=int, default=60, help="training patients the calibration fits on")
    running.add_argument("--val-limit", type=int, help="benchmark only the first N packed validation patients")
    args = parser.parse_args(argv)
    return {"pack": pack, "wheels": wheels, "run": run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
