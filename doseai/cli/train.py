"""``doseai train ...``: the training stages, Pareto plan generation, calibration and export (all resumable or
single-shot; checkpoints in the cache folder).

``train prior``, ``train preference`` and ``train dvh`` also run as several processes:
``torchrun --nproc_per_node N [--nnodes M ...] -m doseai.cli train prior ...`` trains with
DistributedDataParallel (gloo on the CPU, NCCL on CUDA; see :mod:`doseai.train.distributed`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from doseai.cli.common import SHIPPED_DIFFUSION, SHIPPED_DVH, SHIPPED_PREFERENCE, add_device, add_force
from doseai.errors import UnreadableInputError

TRAINING_STAGES = ("prior", "preference", "dvh")  # those that run under torchrun too
# torchrun's own parser reads "--run" as an abbreviation of its --run-path, so these stages take --run-name too
RUN_HELP = "run name (checkpoints in <cache>/runs/<run>); under torchrun spell it --run-name"


def add_batch_options(stage) -> None:
    """``--accumulate``, ``--lr-scaling`` and ``--precision``: the patients of an optimizer step, how the
    learning rate follows them, and the precision (see doseai.train.loop.TrainingConfig)."""
    stage.add_argument("--accumulate", type=int, default=1,
                       help="patients per optimizer step in each process (gradient accumulation; the prior takes "
                            "them as one batch). A step covers accumulate x processes patients, so an epoch takes "
                            "that many times fewer steps (default: %(default)s)")
    stage.add_argument("--lr-scaling", choices=("none", "linear", "sqrt"), default="none",
                       help="learning rate per step: as --lr whatever the patients per step (none, the default), "
                            "or --lr x their number (linear) or x its square root (sqrt)")
    stage.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="training precision: auto (the default) times a forward with and without bf16 autocast "
                            "and keeps the faster; fp32 or bf16 fix it, e.g. so that two runs can be compared")


def add_parser(sub) -> None:
    """``train`` and its stages."""
    train = sub.add_parser("train", help="train the models (resumable; checkpoints in the cache folder)")
    train_sub = train.add_subparsers(dest="stage", required=True)
    prior = train_sub.add_parser("prior", help="Stage I: VQ-VAE dose prior on every training dose")
    preference = train_sub.add_parser("preference", help="Stage II: anatomy encoder + FiLM sliders, frozen prior")
    for stage in (prior, preference):
        stage.add_argument("--run", "--run-name", dest="run", required=True, help=RUN_HELP)
        stage.add_argument("--epochs", type=int, default=30)
        stage.add_argument("--lr", type=float, default=1e-3)
        add_device(stage)
        stage.add_argument("--threads", type=int)
        add_batch_options(stage)
    preference.add_argument("--prior", help="Stage I checkpoint (omit with --no-freeze for the ablation)")
    preference.add_argument("--no-freeze", action="store_true", help="train the decoder too (ablation without Stage I)")
    preference.add_argument("--init", help="start from these weights (e.g. the shipped model) to train on")
    preference.add_argument("--refine-film", action="store_true", help="let the sliders modulate the refinement head")
    preference.add_argument("--neutral-fraction", type=float, default=0.4,
                            help="share of steps at neutral sliders, trained toward the reference dose "
                                 "(default: %(default)s)")
    preference.add_argument("--metric-weight", type=float, default=0.0,
                            help="weight of the DVH-metric loss at neutral sliders: per structure, OAR mean and "
                                 "hottest 1 %%, target coldest 5 %%, hottest 1 %% and mean (default: %(default)s)")
    preference.add_argument("--seed", type=int, default=0,
                            help="seed of the patient order, augmentation and slider draws; runs that differ only "
                                 "in it can be averaged (default: %(default)s)")
    preference.add_argument("--with-ct-less", action="store_true",
                            help="train on the training patients without a CT too (water-equivalent body)")
    preference.add_argument("--snap-to-case", action="store_true",
                            help="train on the model grid snapped to each case's voxel lattice (as predictions use)")
    preference.add_argument("--slice-mm", type=float,
                            help="slice spacing of the model grid (default 5 mm, as the DVH model and the preference "
                                 "models up to v2.2; v2.3 and later use 2.5); the slice count follows so that the "
                                 "field along z stays the same (320 mm)")
    preference.add_argument("--rotate-deg", type=float, default=0.0,
                            help="in half the steps, turn the case about z by up to this many degrees (augmentation; "
                                 "default: %(default)s, off)")
    preference.add_argument("--scale", type=float, default=0.0,
                            help="in the same half of the steps, zoom by up to this fraction (e.g. 0.05; default: "
                                 "%(default)s, off)")
    preference.add_argument("--time-budget-min", type=float,
                            help="after the first and the second epoch, cut --epochs to what fits in this many "
                                 "minutes at that epoch's pace (the learning-rate schedule follows), e.g. for a "
                                 "GPU lent for a fixed time")
    pareto = train_sub.add_parser("pareto", help="Pareto plans (coverage vs OAR sparing) per training patient, "
                                                 "for the DVH-conditioned network; resumable")
    pareto.add_argument("--run", required=True, help="run name (plans in <cache>/pareto/<run>)")
    pareto.add_argument("--plans", type=int, default=10, help="plans per patient (default: %(default)s)")
    pareto.add_argument("--limit", type=int, help="only the first N patients")
    pareto.add_argument("--bixel-mm", type=float, default=10.0)
    pareto.add_argument("--split", default="train", choices=["train", "validation", "test"],
                        help="OpenKBP split (validation/test: held-out plans for the benchmark, never trained on)")
    pareto.add_argument("--varied", type=int, default=4,
                        help="of the plans, how many draw an independent weight per OAR (default: %(default)s)")
    pareto.add_argument("--shard", default="0/1", help="K/N: every N-th patient from the K-th, to run N processes")
    fluence = train_sub.add_parser("fluence-set", help="per patient with a CT, the plan mimicking its clinical dose "
                                                       "(weights, bixels, beams, objective history): the learned "
                                                       "planner's training data; resumable")
    fluence.add_argument("--run", required=True, help="run name (records in <cache>/fluence_set/<run>)")
    fluence.add_argument("--split", default="train", choices=["train", "validation", "test"])
    fluence.add_argument("--limit", type=int, help="only the first N patients (after those skipped)")
    fluence.add_argument("--skip", type=int, default=0, help="leave out the split's first N patients")
    fluence.add_argument("--bixel-mm", type=float, default=10.0)
    fluence.add_argument("--beams", type=int, default=9)
    fluence.add_argument("--iterations", type=int, default=300, help="L-BFGS-B iterations (default: %(default)s)")
    fluence.add_argument("--shard", default="0/1", help="K/N: every N-th patient from the K-th, to run N processes")
    fluence.add_argument("--out", help="the folder of the records (default: <cache>/fluence_set/<run>/<split>)")
    fluence.add_argument("--keep-influence", metavar="DIR",
                         help="keep each patient's influence matrix in DIR too (tens of MB each; for training the "
                              "learned optimizer without recomputing them)")
    fluence.add_argument("--with-ct-less", action="store_true",
                         help="plan the patients without a CT too, on water inside the body")
    learned = train_sub.add_parser("learned-optimizer", help="the LSTM learned fluence optimizer, unrolled on the "
                                                             "training patients' mimicking problems (resumable)")
    learned.add_argument("--run", required=True, help="run name (checkpoints in <cache>/runs/<run>)")
    learned.add_argument("--fluence-set", required=True, help="a training fluence set (doseai train fluence-set)")
    learned.add_argument("--influence", required=True, help="its kept influence matrices (--keep-influence)")
    learned.add_argument("--epochs", type=int, default=30)
    learned.add_argument("--lr", type=float, default=3e-3)
    learned.add_argument("--steps", type=int, default=30, help="updates per unroll (default: %(default)s)")
    learned.add_argument("--patients", type=int, default=40,
                         help="at most this many training patients, ~0.3 GB of memory each (default: %(default)s)")
    learned.add_argument("--generator", metavar="PT",
                         help="fluence generator weights: a share of the unrolls refines its starts, and the patients "
                              "it was fitted on are left out")
    learned.add_argument("--generator-share", type=float, default=0.75,
                         help="share of the unrolls from the generator's starts (default: %(default)s)")
    learned.add_argument("--init", metavar="PT", help="start from these learned-optimizer weights")
    learned.add_argument("--threads", type=int)
    learned.add_argument("--export", metavar="PT", help="after training, write the weights and card here")
    generator = train_sub.add_parser("fluence-generator", help="the fluence generator: a diffusion model of beam "
                                     "fluence maps, distilled to one step (resumable)")
    generator.add_argument("--run", required=True, help="run name (checkpoints in <cache>/runs/<run>/teacher, /student)")
    generator.add_argument("--fluence-set", required=True, help="a training fluence set (doseai train fluence-set)")
    generator.add_argument("--influence", required=True, help="its kept influence matrices (--keep-influence)")
    generator.add_argument("--epochs", type=int, default=40, help="the teacher's epochs of --steps-per-epoch steps")
    generator.add_argument("--student-epochs", type=int, default=15, help="the one-step distillation's epochs")
    generator.add_argument("--steps-per-epoch", type=int, default=100)
    generator.add_argument("--lr", type=float, default=1e-3)
    generator.add_argument("--tune-epochs", type=int, default=10,
                           help="epochs tuning the one-step generator on the objective itself (0: distilled only)")
    generator.add_argument("--tune-patients", type=int, default=32,
                           help="training patients whose objectives the tuning holds, ~0.3 GB of memory each")
    generator.add_argument("--patients", type=int, help="at most this many training patients (default: all kept)")
    generator.add_argument("--threads", type=int)
    generator.add_argument("--export", metavar="PT", help="after training, write both networks and the card here")
    dvh = train_sub.add_parser("dvh", help="the DVH-conditioned network on generated Pareto plans (resumable)")
    dvh.add_argument("--run", "--run-name", dest="run", required=True, help=RUN_HELP)
    dvh.add_argument("--pareto-run", required=True, help="the `doseai train pareto --run` whose plans to learn from")
    dvh.add_argument("--init", help="preference weights the encoder, decoder and prior start from "
                                    "(default: the shipped preference model)")
    dvh.add_argument("--epochs", type=int, default=20)
    dvh.add_argument("--lr", type=float, default=5e-4)
    add_device(dvh)
    dvh.add_argument("--threads", type=int)
    add_batch_options(dvh)
    dvh.add_argument("--targets", choices=("mixes", "plans"), default="mixes",
                     help="projection onto the Pareto set: the nearest mix of two plans (default) or plan")
    dvh.add_argument("--edit-metric-weight", type=float, default=1.0,
                     help="in a one-curve edit, how much the edited structure's mean/near-max loss term counts "
                          "(default: %(default)s, like every other structure)")
    dvh.add_argument("--pair-weight", type=float, default=0.0,
                     help="> 0: pair each sample with a plan of its patient (the unedited plan of an edit) and add "
                          "this weight x the loss on the change between the two predictions (default: off)")
    dvh.add_argument("--near-max-weight", type=float, default=0.5,
                     help="weight of each structure's near-max (top 2 %%) dose error in the loss (default: %(default)s)")
    dvh.add_argument("--mean-offset", action="store_true",
                     help="add the layer that moves each structure's mean dose toward its desired curve's "
                          "(learned gains; doseai/models/dvh_conditioned.py)")
    diffusion = train_sub.add_parser("diffusion", help="the residual dose diffusion model around the preference "
                                                       "model (several plausible doses; resumable)")
    diffusion.add_argument("--run", "--run-name", dest="run", required=True, help=RUN_HELP)
    diffusion.add_argument("--base", default=SHIPPED_PREFERENCE,
                           help="the preference weights whose neutral dose the samples vary (default: shipped)")
    diffusion.add_argument("--epochs", type=int, default=60)
    diffusion.add_argument("--lr", type=float, default=2e-4)
    diffusion.add_argument("--batch", type=int, default=4, help="patients per step (default: %(default)s)")
    diffusion.add_argument("--dvh-weight", type=float, default=0.1,
                           help="weight of the clinical-metric term (0: the ablation; default: %(default)s)")
    diffusion.add_argument("--minutes", type=float, help="stop after the epoch that passes this many minutes")
    diffusion.add_argument("--seed", type=int, default=0)
    add_device(diffusion)
    diffusion.add_argument("--threads", type=int)
    calibrate_diffusion = train_sub.add_parser(
        "calibrate-diffusion", help="refit the diffusion card's DVH-metric bands on the case grid of training patients")
    calibrate_diffusion.add_argument("--weights", default=SHIPPED_DIFFUSION)
    calibrate_diffusion.add_argument("--every", type=int, default=5, help="every N-th training patient (default: 5)")
    calibrate_diffusion.add_argument("--samples", type=int, default=8)
    calibrate_diffusion.add_argument("--threads", type=int)
    export_diffusion = train_sub.add_parser("export-diffusion",
                                            help="write the diffusion model's weights (EMA) + model card")
    export_diffusion.add_argument("--checkpoint", required=True)
    export_diffusion.add_argument("--out", default=SHIPPED_DIFFUSION)
    export_diffusion.add_argument("--ablation", help="the checkpoint of the run without the clinical-metric term")
    add_force(export_diffusion)
    calibrate = train_sub.add_parser("calibrate-dvh", help="measure on training Pareto plans the offset of the "
                                     "DVH model's near-max matching and write it into its card")
    calibrate.add_argument("--weights", default=SHIPPED_DVH)
    calibrate.add_argument("--pareto-run", required=True)
    calibrate.add_argument("--limit", type=int, default=10, help="training patients (default: %(default)s)")
    calibrate_edit = train_sub.add_parser("calibrate-edit", help="fit on training patients, from the preference "
                                          "model's dose, the gain on a DVH edit's change per OAR (so that an edit "
                                          "achieves what it asks) and write it into the DVH model's card")
    calibrate_edit.add_argument("--weights", default=SHIPPED_DVH)
    calibrate_edit.add_argument("--limit", type=int, default=15, help="training patients (default: %(default)s)")
    calibrate_edit.add_argument("--threads", type=int)
    calibrate_pref = train_sub.add_parser("calibrate-preference",
                                          help="fit the preference model's case-grid calibration (target lift, OAR "
                                               "near-max) on training patients and write it into its card")
    calibrate_pref.add_argument("--weights", default=SHIPPED_PREFERENCE)
    calibrate_pref.add_argument("--limit", type=int, default=60, help="training patients (default: %(default)s)")
    calibrate_pref.add_argument("--threads", type=int)
    calibrate_pref.add_argument("--mirror-average", action=argparse.BooleanOptionalAction,
                                help="fit on doses averaged over the case and its left-right mirror, and make that "
                                     "the card's default (default: as the card says)")
    calibrate_pref.add_argument("--mirror-neutral", action=argparse.BooleanOptionalAction,
                                help="fit on doses whose neutral part is averaged over the case and its mirror (see "
                                     "predict --mirror-neutral), and make that the card's default (default: as the "
                                     "card says)")
    export_dvh = train_sub.add_parser("export-dvh", help="write the DVH-conditioned model's weights + model card")
    export_dvh.add_argument("--checkpoint", required=True)
    export_dvh.add_argument("--out", default=SHIPPED_DVH)
    add_force(export_dvh)
    prior_out = train_sub.add_parser("prior-from-weights",
                                     help="the Stage I prior inside shipped preference weights, as a --prior "
                                          "checkpoint (to go on training from shipped weights)")
    prior_out.add_argument("--weights", default=SHIPPED_PREFERENCE)
    prior_out.add_argument("--out", required=True)
    add_force(prior_out)
    average = train_sub.add_parser("average", help="average weights of one network from runs that differ only in "
                                                   "their seed (a model soup), with the first one's card")
    average.add_argument("--weights", nargs="+", required=True)
    average.add_argument("--out", required=True)
    add_force(average)
    export = train_sub.add_parser("export", help="write shipped weights + model card")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--prior", help="the Stage I checkpoint (documented in the card); omit for the ablation")
    export.add_argument("--out", default=SHIPPED_PREFERENCE)
    add_force(export)


def _train(args) -> Path:
    """Run the training stage ``args.stage`` (one of TRAINING_STAGES); its last checkpoint."""
    from doseai.models.features import DEFAULT_GRID as spec
    batch = {"accumulate": args.accumulate, "lr_scaling": args.lr_scaling, "precision": args.precision}
    if args.stage == "prior":
        from doseai.train.train_prior import PriorTrainingConfig, train_dose_prior

        return train_dose_prior(spec, PriorTrainingConfig(run_name=args.run, epochs=args.epochs, learning_rate=args.lr,
                                                          device=args.device, threads=args.threads, **batch))
    if args.stage == "preference":
        from dataclasses import replace

        from doseai.models.features import with_slice_spacing
        from doseai.train.train_preference import PreferenceTrainingConfig, train_preference

        if args.slice_mm is not None:
            spec = with_slice_spacing(spec, args.slice_mm)
        spec = replace(spec, snap_to_case=args.snap_to_case)

        if not args.prior and not args.no_freeze:
            raise UnreadableInputError("--prior CHECKPOINT is required unless --no-freeze (the ablation)")
        config = PreferenceTrainingConfig(
            run_name=args.run, epochs=args.epochs, learning_rate=args.lr, device=args.device, threads=args.threads,
            seed=args.seed, freeze_prior=not args.no_freeze, init_weights=Path(args.init) if args.init else None,
            network={"refine_film": True} if args.refine_film else None,
            neutral_fraction=args.neutral_fraction, metric_weight=args.metric_weight,
            with_ct_less=args.with_ct_less, rotate_deg=args.rotate_deg, scale=args.scale,
            time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None, **batch)
        return train_preference(spec, Path(args.prior) if args.prior else None, config)
    from doseai.predict import DEFAULT_MODEL
    from doseai.train.train_dvh import DVHTrainingConfig, train_dvh

    config = DVHTrainingConfig(
        run_name=args.run, epochs=args.epochs, learning_rate=args.lr, device=args.device, threads=args.threads,
        targets=args.targets, edit_metric_weight=args.edit_metric_weight, pair_weight=args.pair_weight,
        mean_offset=args.mean_offset, near_max_weight=args.near_max_weight, **batch)
    return train_dvh(spec, args.pareto_run, Path(args.init) if args.init else DEFAULT_MODEL, config)


def run(args) -> int:
    """``doseai train STAGE``: run the stage; 0 when done."""
    if args.stage in TRAINING_STAGES:
        from doseai.train.distributed import is_main_process, shutdown

        try:
            path = _train(args)
            if is_main_process():  # under torchrun, one line for all processes
                print(f"wrote {path}")
        finally:
            shutdown()  # the process group init_from_environment started, if any
        return 0
    if args.stage == "diffusion":
        from doseai.models.features import GridSpec
        from doseai.predict import load_card
        from doseai.train.train_diffusion import DiffusionTrainingConfig, train_diffusion

        config = DiffusionTrainingConfig(
            run_name=args.run, base_weights=args.base, epochs=args.epochs, learning_rate=args.lr, batch=args.batch,
            dvh_weight=args.dvh_weight, minutes=args.minutes, seed=args.seed, device=args.device,
            threads=args.threads)
        print(f"wrote {train_diffusion(GridSpec.from_card(load_card(Path(args.base))), config)}")
        return 0
    if args.stage == "calibrate-diffusion":
        from doseai.train.train_diffusion import calibrate_metric_bands

        fit = calibrate_metric_bands(Path(args.weights), args.every, args.samples, args.threads)
        print("metric band RMS (x highest prescription), factor: " + ", ".join(
            f"{k} {v:.4f} x{fit['metric_band_factor'][k]:.2f}" for k, v in fit["metric_rms"].items()))
        return 0
    if args.stage == "export-diffusion":
        from doseai.train.export import export_diffusion_model

        out = export_diffusion_model(Path(args.checkpoint), Path(args.out), Path(args.ablation) if args.ablation
                                     else None, force=args.force)
        print(f"wrote {out} and {out.with_suffix('.json')}")
        return 0
    if args.stage == "calibrate-dvh":
        from doseai.train.train_dvh import calibrate_near_max

        matching = calibrate_near_max(Path(args.weights), args.pareto_run, args.limit)
        print(f"near-max matching offset {matching['offset_relative']:+.4f} x Rx ({matching['calibration']})")
        path = Path(args.weights).with_suffix(".json")
    elif args.stage == "calibrate-edit":
        from doseai.train.train_dvh import calibrate_edit_gain

        calibration = calibrate_edit_gain(Path(args.weights), args.limit, threads=args.threads)
        print("edit gains: " + ", ".join(f"{name} {gain:.3f}" for name, gain in calibration["gains"].items())
              + f" ({calibration['calibration']})")
        path = Path(args.weights).with_suffix(".json")
    elif args.stage == "calibrate-preference":
        from doseai.train.calibrate_preference import calibrate_preference

        entry = calibrate_preference(Path(args.weights), args.limit, args.threads, args.mirror_average,
                                     args.mirror_neutral)
        fit = entry["fit"]
        print(f"target lift {entry['target_lift']:g} (lower targets {entry['lower_target_lift']:g}) to "
              f"{entry['target_level']:g} x Rx, OAR near-max "
              f"{entry['oar_near_max']:g} x Rx; training dose / DVH score {fit['before']['dose_score_gy']:.3f} / "
              f"{fit['before']['dvh_score_gy']:.3f} -> {fit['after']['dose_score_gy']:.3f} / "
              f"{fit['after']['dvh_score_gy']:.3f} Gy ({fit['patients']} patients); plan level range "
              f"{entry['plan_level_range'][0]:.3f}-{entry['plan_level_range'][1]:.3f} x Rx")
        path = Path(args.weights).with_suffix(".json")
    elif args.stage == "export-dvh":
        from doseai.train.export import export_dvh_model

        path = export_dvh_model(Path(args.checkpoint), Path(args.out), force=args.force)
    elif args.stage == "average":
        from doseai.train.export import average_weights

        path = average_weights([Path(w) for w in args.weights], Path(args.out), force=args.force)
    elif args.stage == "prior-from-weights":
        from doseai.train.export import prior_from_weights

        path = prior_from_weights(Path(args.weights), Path(args.out), force=args.force)
    elif args.stage == "pareto":
        from doseai.train.pareto import generate_pareto

        shard = tuple(int(part) for part in args.shard.split("/"))
        path = generate_pareto(args.run, split=args.split, n_plans=args.plans, limit=args.limit,
                               bixel_width_mm=args.bixel_mm, n_varied=args.varied, shard=shard)
    elif args.stage == "fluence-set":
        from doseai.optimize.plan import PlanSettings
        from doseai.train.fluence_set import generate_fluence_set

        settings = PlanSettings(mode="mimic", n_beams=args.beams, bixel_width_mm=args.bixel_mm,
                                max_iterations=args.iterations)
        path = generate_fluence_set(args.run, args.split, settings, args.limit,
                                    tuple(int(part) for part in args.shard.split("/")), args.out,
                                    Path(args.keep_influence) if args.keep_influence else None, args.with_ct_less,
                                    args.skip)
    elif args.stage == "learned-optimizer":
        from doseai.train.train_learned_optimizer import (
            LearnedOptimizerConfig, export_learned_optimizer, train_learned_optimizer,
        )

        path = train_learned_optimizer(Path(args.fluence_set), Path(args.influence), LearnedOptimizerConfig(
            run_name=args.run, epochs=args.epochs, learning_rate=args.lr, steps=args.steps, patients=args.patients,
            threads=args.threads, generator=args.generator, generator_share=args.generator_share, init=args.init))
        if args.export:
            path = export_learned_optimizer(path, Path(args.export))
    elif args.stage == "fluence-generator":
        from doseai.train.train_fluence_generator import (
            FluenceGeneratorConfig, export_fluence_generator, train_fluence_generator,
        )

        path = train_fluence_generator(Path(args.fluence_set), Path(args.influence), FluenceGeneratorConfig(
            run_name=args.run, epochs=args.epochs, student_epochs=args.student_epochs,
            steps_per_epoch=args.steps_per_epoch, learning_rate=args.lr, patients=args.patients, threads=args.threads,
            tune_epochs=args.tune_epochs, tune_patients=args.tune_patients))
        if args.export:
            path = export_fluence_generator(path, Path(args.export))
    else:
        from doseai.train.export import export_model

        path = export_model(Path(args.checkpoint), Path(args.prior) if args.prior else None, Path(args.out),
                            force=args.force)
    print(f"wrote {path}")
    return 0
