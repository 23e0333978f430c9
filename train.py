"""Train a YOLOv5 detector, optionally distilling from a frozen teacher's outputs.

    python train.py --data shapes.yaml --cfg yolov5n.yaml --weights '' --imgsz 320 --epochs 30
    python train.py --data coco.yaml --weights student.pt --t_weights teacher.pt --epochs 100
    python train.py --data shapes.yaml --weights student.pt --epochs 10 --evolve 300    # tune the hyp yaml
    torchrun --nproc_per_node 2 train.py ...            # DDP (gloo on CPU, nccl on GPU)

This file parses flags and wires the pieces; the loop itself is utils.training.engine.train_one_epoch and val.run.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

import val as validate
from models.yolo import Model, check_img_size, set_inplace_activations, to_training_layout
from optimizer.config import KD_HYP_KEYS, KD_SPECS, KDConfig, add_kd_args, without_settings
from optimizer.criterion import DetectionCriterion, Distiller, Student
from optimizer.teacher import check_teacher_unchanged, file_sha256
from utils.core.config import read_yaml, yaml_save
from utils.core.distributed import (DistInfo, broadcast_flag, cleanup_distributed, de_parallel, dist_info_from_env,
                                    init_distributed, main_process_first, select_device)
from utils.core.download import ensure_weights
from utils.core.errors import UserError, report
from utils.core.log import get_latest_run, hold_run_folder, increment_path, setup_logging
from utils.core.runtime import init_seeds, keep_freed_memory
from utils.data.datasets import (DatasetSpec, DataSettings, LoadImagesAndLabels, available_memory, batch_memory_need,
                                 check_dataset, create_dataloader, reseed_loader)
from utils.data.unlabeled import UnlabeledStream, build_unlabeled_stream, check_unlabeled_overlap
from utils.evaluation.metrics import fitness
from utils.reporting.loggers import RunLogger
from utils.training.anchors import check_anchors
from utils.training.checkpoint import make_contiguous, model_from_ckpt, torch_load
from utils.training.engine import LoopConfig, LoopState, train_one_epoch
from utils.training.forward import AMP_CHOICES, CompiledForward, StudentForward, resolve_amp
from utils.training.hyp import load_hyp
from utils.training.keeper import CheckpointKeeper, ResumePoint, restore_ema
from utils.training.loss import ComputeLoss, scale_hyp
from utils.training.optim import (NBS, EarlyStopping, ModelEMA, Optim, accumulate_steps, build_optimizer,
                                  build_scheduler, lr_lambda)

ROOT = Path(__file__).resolve().parent

LOGGER = logging.getLogger("yolov5kd")
DEFAULT_HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"


def build_student(opt, nc: int, hyp: dict, device: torch.device) -> tuple[nn.Module, dict | None]:
    """Student from --weights (checkpoint) and/or --cfg; a pruned checkpoint is trained as it is."""
    weights, cfg = str(opt.weights or ""), str(opt.cfg or "")
    if weights.endswith(".pt"):
        ckpt = torch_load(weights, trust=opt.trust_checkpoint)
        loaded = model_from_ckpt(ckpt, weights, prefer_ema=False)
        model = Model(cfg or loaded.yaml, ch=3, nc=nc, anchors=hyp.get("anchors"))
        exclude = ["anchor"] if (cfg or hyp.get("anchors")) and not opt.resume else []
        src = loaded.state_dict()
        dst = model.state_dict()
        csd = {k: v for k, v in src.items()
               if k in dst and v.shape == dst[k].shape and not any(x in k for x in exclude)}
        shape_mismatch = [k for k, v in src.items() if k in dst and v.shape != dst[k].shape and "model.24" not in k
                          and not k.startswith(f"model.{len(model.model) - 1}.")]
        if shape_mismatch and not cfg:
            # layer widths no longer match the yaml (a pruned or searched student): train the object as loaded
            if int(loaded.model[-1].nc) != nc:
                raise UserError(f"{weights}: this pruned model has nc={loaded.model[-1].nc} but the dataset has "
                                f"nc={nc}; a pruned head cannot be rebuilt from its yaml")
            LOGGER.info(f"{weights}: layer shapes differ from its yaml ({len(shape_mismatch)} tensors), "
                        f"training the checkpoint's own architecture")
            model = loaded
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            model.load_state_dict(csd, strict=False)
            LOGGER.info(f"Transferred {len(csd)}/{len(dst)} items from {weights}")
        exact = (ckpt.get("resume_state") or {}).get("model") if opt.resume and isinstance(ckpt, dict) else None
        if exact is not None:
            model.load_state_dict(exact)  # fp32 weights, so a resumed run continues bit-exactly
        return model.to(device), ckpt
    if weights:
        raise UserError(f"--weights {weights}: expected a .pt checkpoint (or '' to train from --cfg)")
    if not cfg:
        raise UserError("give --weights student.pt, or --cfg yolov5n.yaml with --weights '' to train from scratch")
    return Model(cfg, ch=3, nc=nc, anchors=hyp.get("anchors")).to(device), None


def freeze_layers(model: nn.Module, freeze: list[int]) -> None:
    """Stop gradients for layers listed (one number N means layers 0..N-1)."""
    layers = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad_(True)
        if any(x in k for x in layers):
            LOGGER.info(f"freezing {k}")
            v.requires_grad_(False)
    if not any(v.requires_grad for v in model.parameters()):
        n = len(model.model)
        raise UserError(f"--freeze {' '.join(map(str, freeze))}: freezes every layer of this {n}-layer model "
                        f"(layers 0..{n - 1}), so nothing is left to train")


@dataclass
class Setup:
    """Everything the epoch loop needs, built once by setup()."""

    save_dir: Path
    data: DatasetSpec
    names: dict
    model: nn.Module  # the trained module (DDP-wrapped under torchrun)
    ema: ModelEMA | None  # main process only
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lf: Callable[[int], float]
    hyp: dict  # this run's copy, weight decay scaled for the batch size
    opt_record: dict  # the options as the checkpoints record them (run_record)
    train_loader: Any
    val_loader: Any
    compute_loss: ComputeLoss
    criterion: DetectionCriterion
    keeper: CheckpointKeeper
    logger: RunLogger | None
    stopper: EarlyStopping
    scaler: torch.amp.GradScaler
    imgsz: int
    gs: int
    batch_size: int
    amp_dtype: torch.dtype | None
    resume: ResumePoint
    reference: dict[str, float] | None


def load_data(opt: argparse.Namespace, info: DistInfo, kd: KDConfig) -> tuple[DatasetSpec, int, dict]:
    """The dataset spec, nc and class names; 'unlabeled:' images without a teacher, and pseudo-labels without
    'unlabeled:' images, are refused here."""
    with main_process_first(info):
        data = check_dataset(opt.data)
    if data.unlabeled and not kd.enabled:
        raise UserError(f"{opt.data}: 'unlabeled:' images need a teacher (--t_weights): without one they carry no "
                        f"training signal; add a teacher or remove the key")
    if kd.enabled and kd.pseudo_conf > 0 and not data.unlabeled:
        what = ("its 'unlabeled:' lists no images" if "unlabeled" in data.keys
                else "this dataset yaml has no 'unlabeled:' key")
        raise UserError(f"{opt.data}: pseudo_conf {kd.pseudo_conf:g} needs unlabelled images to label, and {what}; "
                        f"add some or set pseudo_conf 0")
    if data.unlabeled:
        check_unlabeled_overlap(data.unlabeled, {"val": data.val, "test": data.test}, opt.data)
    nc = 1 if opt.single_cls else data.nc
    names = {0: "item"} if opt.single_cls and data.nc != 1 else data.names
    return data, nc, names


def build_loaders(opt: argparse.Namespace, info: DistInfo, data: DatasetSpec, hyp: dict, kd: KDConfig, imgsz: int,
                  gs: int, nc: int) -> tuple[Any, Any, np.ndarray, Any, UnlabeledStream | None]:
    """(train loader, its dataset, all its label rows, val loader (main process only), unlabelled stream or None)."""
    # rows are checked against the dataset's own classes; --single-cls then merges them into class 0
    train = DataSettings(imgsz=imgsz, batch_size=opt.batch_size // info.world_size, augment=True, hyp=hyp,
                         rect=opt.rect, cache=opt.cache, single_cls=opt.single_cls, stride=gs, prefix="train: ",
                         nc=data.nc)
    with main_process_first(info):
        dataset = LoadImagesAndLabels(data.train, train)
        train_loader = create_dataloader(dataset, workers=opt.workers, shuffle=True, rank=info.rank,
                                         world_size=info.world_size, seed=opt.seed)
    labels = np.concatenate(dataset.labels, 0) if len(dataset.labels) else np.zeros((0, 5))
    if len(labels) and int(labels[:, 0].max()) >= nc:
        raise UserError(f"{opt.data}: label class {int(labels[:, 0].max())} exceeds nc={nc}")
    unlabeled = None
    if data.unlabeled:
        with main_process_first(info):
            unlabeled = build_unlabeled_stream(data.unlabeled, kd.unlabeled_ratio, train, workers=opt.workers,
                                               rank=info.rank, world_size=info.world_size, seed=opt.seed)
        if unlabeled is not None:
            both = len(set(dataset.im_files) & set(unlabeled.dataset.im_files))
            if both:
                LOGGER.warning(f"WARNING: {both} image(s) are listed under both 'train:' and 'unlabeled:'; they "
                               f"are used both ways")
    val_loader = None
    if info.is_main:
        val = DataSettings(imgsz=imgsz, batch_size=train.batch_size * 2, hyp=hyp, rect=True,
                           cache=None if opt.noval else opt.cache, single_cls=opt.single_cls, stride=gs, pad=0.5,
                           prefix="val: ", nc=data.nc)
        val_set = LoadImagesAndLabels(data.val, val)
        val_loader = create_dataloader(val_set, workers=opt.workers * 2)
        if not any(len(x) for x in val_set.labels):
            LOGGER.warning(f"WARNING: val: {data.val} has no labels, so mAP cannot be measured (fitness "
                           f"counts as 0); training goes on and best.pt follows the latest epoch")
    return train_loader, dataset, labels, val_loader, unlabeled


def setup(hyp: dict, opt: argparse.Namespace, device: torch.device, info: DistInfo, kd: KDConfig) -> Setup:
    """Build the run: data, student, optimizer and schedule (restored on --resume), loaders, EMA, criterion,
    logger and checkpoint keeper. Writes hyp.yaml/opt.yaml of a new run; changes neither `hyp` nor `opt`."""
    hyp = dict(hyp)
    resuming = bool(opt.resume)
    save_dir = Path(opt.save_dir)
    main = info.is_main
    init_seeds(opt.seed + 1 + info.rank, deterministic=True)
    torch.set_flush_denormal(True)  # denormal activations/gradients make CPU kernels several % slower
    keep_freed_memory()  # reuse freed activation memory instead of page-faulting it in again every step
    data, nc, names = load_data(opt, info, kd)
    model, ckpt = build_student(opt, nc, hyp, device)
    ckpt = ckpt if resuming else None  # from here on, a checkpoint means "resume from it"
    model = to_training_layout(model)
    amp_dtype = resolve_amp(opt.amp, device)
    freeze_layers(model, opt.freeze)
    keeper = CheckpointKeeper(save_dir, save_period=opt.save_period, nosave=opt.nosave)
    hyp_record, opt_record = run_record(hyp, opt, kd)
    if main:  # written once the run is known to be trainable
        start_run_folder(keeper, hyp_record, opt_record, resuming)
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)
    batch_size = opt.batch_size

    hyp["weight_decay"] *= batch_size * accumulate_steps(batch_size) / NBS
    resume = ResumePoint(epochs=opt.epochs)
    if ckpt is not None:
        resume = ResumePoint.from_checkpoint(ckpt, opt.weights, opt.epochs)
        if main:
            keeper.clean_interrupted(resume.start_epoch - 1)
    if opt.sync_bn and info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)

    train_loader, dataset, labels, val_loader, unlabeled = build_loaders(opt, info, data, hyp, kd, imgsz, gs, nc)
    if main and ckpt is None:
        if not opt.noautoanchor:
            check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz)
        model.half().float()  # round weights to fp16 once, as the reference does, so saved = trained
        if not opt.noplots:
            from utils.reporting.plots import plot_labels
            plot_labels(labels, names, save_dir)
    # the EMA starts from the model as trained: after AutoAnchor and the fp16 rounding
    model, ema = wrap_student(model, ckpt, info, device)

    base = de_parallel(model)
    base.nc = nc
    loss_hyp = scale_hyp(hyp, base.model[-1].nl, nc, imgsz, opt.label_smoothing)
    base.hyp = loss_hyp  # a record only, as official checkpoints carry it; the losses get loss_hyp itself
    base.names = names
    if ema is not None:
        ema.update_attr(model)

    compute_loss = ComputeLoss(base, hyp=loss_hyp)
    # the module (and checkpoints) stay plain under --compile: only the training forward is compiled
    forward = StudentForward(device, amp_dtype, CompiledForward(model) if opt.compile else None, info.world_size)
    criterion = build_criterion(kd, compute_loss, base, imgsz, forward, opt.trust_checkpoint, unlabeled, opt.seed)
    criterion.plan(resume.epochs)  # the teacher's weight schedule falls over the whole run
    # the optimizer comes after the criterion: it also trains what the criterion trains beside the student
    optimizer = build_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"],
                                extra=criterion.trainable())
    lf = lr_lambda(resume.epochs, hyp["lrf"], opt.cos_lr)
    scheduler = build_scheduler(optimizer, lf, resume.start_epoch, ckpt.get("optimizer") if ckpt else None)
    if ckpt is not None:
        criterion.load_state_dict((ckpt.get("resume_state") or {}).get("criterion") or {})
    del ckpt
    reference = None
    if main and not opt.noval and not resuming:
        reference = reference_scores(criterion, model, opt, data, val_loader)
    stopper = EarlyStopping(patience=opt.patience)
    stopper.best_fitness = resume.best_fitness if resuming else -1.0
    logger = RunLogger(save_dir, hyp={**hyp, **kd.hyp_values()}, opt=opt_record, parts=criterion.parts,
                       figures=criterion.figures, columns=criterion.columns, tensorboard=True,
                       plots=not opt.noplots) if main else None
    return Setup(save_dir=save_dir, data=data, names=names, model=model, ema=ema, optimizer=optimizer,
                 scheduler=scheduler, lf=lf, hyp=hyp, opt_record=opt_record, train_loader=train_loader,
                 val_loader=val_loader, compute_loss=compute_loss, criterion=criterion, keeper=keeper, logger=logger,
                 stopper=stopper, scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
                 imgsz=imgsz, gs=gs, batch_size=batch_size, amp_dtype=amp_dtype, resume=resume, reference=reference)


def start_run_folder(keeper: CheckpointKeeper, hyp_record: dict, opt_record: dict, resuming: bool) -> None:
    """The run's weights/ folder, and hyp.yaml and opt.yaml of a new run (a resumed run keeps those it began with)."""
    keeper.dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        yaml_save(keeper.save_dir / "hyp.yaml", hyp_record)
        yaml_save(keeper.save_dir / "opt.yaml", opt_record)


def wrap_student(model: nn.Module, ckpt: dict | None, info: DistInfo,
                 device: torch.device) -> tuple[nn.Module, ModelEMA | None]:
    """The EMA of the student (main process only; restored on --resume) and, under torchrun, the DDP wrapper."""
    ema = ModelEMA(model) if info.is_main else None
    if ema is not None:
        set_inplace_activations(ema.ema, True)  # evaluated without autograd: in place saves a copy
    if ema is not None and ckpt is not None:
        restore_ema(ckpt, ema)
    if info.distributed:
        # DDP broadcasts rank 0's parameters and buffers (AutoAnchor's anchors included) to every rank
        cuda = device.type == "cuda"
        model = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None,
                                                    output_device=info.local_rank if cuda else None)
    return model, ema


def train(hyp: dict, opt: argparse.Namespace, device: torch.device, info: DistInfo, kd: KDConfig) -> tuple:
    """Run the whole training; returns the final validation results tuple."""
    opt = without_settings(opt)  # the distillation values in effect live in `kd` alone from here on
    with hold_run_folder(opt.save_dir, hold=info.is_main):
        r = setup(hyp, opt, device, info, kd)
        t0 = time.time()
        results, epochs_run = run_epochs(r, opt, device, info)
        if info.is_main:
            LOGGER.info(f"\n{epochs_run} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
            results = finish(r, opt, device, info, results)
    return results


def run_epochs(r: Setup, opt: argparse.Namespace, device: torch.device, info: DistInfo) -> tuple[tuple, int]:
    """The epoch loop: train, validate, log and save each epoch; returns (last results, epochs run)."""
    main = info.is_main
    nb = len(r.train_loader)
    nw = max(round(r.hyp["warmup_epochs"] * nb), 100)
    state = LoopState(last_opt_step=r.resume.start_epoch * nb - 1)
    best_fitness = r.resume.best_fitness
    results = (0, 0, 0, 0, 0, 0, 0)
    for line in r.criterion.describe():
        LOGGER.info(line)
    cfg = LoopConfig(epochs=r.resume.epochs, device=device, lf=r.lf, batch_size=r.batch_size, nw=nw, imgsz=r.imgsz,
                     gs=r.gs, world_size=info.world_size, multi_scale=opt.multi_scale, show_progress=main,
                     warmup={k: r.hyp[k] for k in ("warmup_bias_lr", "warmup_momentum", "momentum")})
    extra = r.criterion.trainable()
    optim = Optim(r.optimizer, r.scaler, r.ema, tuple(extra.parameters()) if extra is not None else ())
    LOGGER.info(f"Image sizes {r.imgsz} train, {r.imgsz} val\nUsing {r.train_loader.num_workers} dataloader workers\n"
                f"Logging results to {r.save_dir}\nStarting training for {r.resume.epochs} epochs...")

    def on_batch(ni, imgs, targets, paths):
        if r.logger is not None and not opt.noplots and ni < 3:
            r.logger.log_batch_images(ni, imgs, targets, paths, r.names)
            for suffix, (images, boxes) in r.criterion.samples().items():  # e.g. the pseudo-labelled images
                r.logger.log_batch_images(ni, images, boxes, None, r.names, suffix=f"_{suffix}")

    epochs_run = 0
    for epoch in range(r.resume.start_epoch, r.resume.epochs):
        # reseeding per epoch makes an epoch's augmentation independent of earlier epochs, so a resumed run
        # (workers 0) replays exactly what an uninterrupted one would have done
        init_seeds(opt.seed + 1 + info.rank + 1000 * epoch)
        reseed_loader(r.train_loader, opt.seed, info.rank, epoch)
        res = train_one_epoch(r.model, r.train_loader, r.criterion, optim, epoch, state, cfg,
                              on_batch=on_batch if epoch == 0 else None)
        r.scheduler.step()
        epochs_run += 1
        stop = False
        if main:
            r.ema.update_attr(r.model)
            final_epoch = epoch + 1 == r.resume.epochs or r.stopper.possible_stop
            if not opt.noval or final_epoch:
                results = validate.evaluate(validation_copy(r.ema.ema), r.val_loader, r.data,
                                            compute_loss=r.compute_loss, half=r.amp_dtype is not None,
                                            single_cls=opt.single_cls, plots=False, save_dir=r.save_dir).results
            fi = float(fitness(np.array(results).reshape(1, -1))[0])
            fi = fi if np.isfinite(fi) else 0.0  # no labels (or no predictions) must not block best.pt
            stop = r.stopper(epoch=epoch, fitness=fi)
            best_fitness = max(best_fitness, fi)
            r.logger.log_epoch(epoch, res.mloss, results, res.lrs, r.criterion.column_values())
            extra = r.criterion.epoch_scalars(res.mloss)
            if extra:
                r.logger.log_scalars(extra, epoch)
            r.keeper.save(epoch, r.model, r.ema, r.optimizer, r.opt_record, best_fitness, fi, final_epoch,
                          r.criterion.state_dict())
        if broadcast_flag(stop, info):
            break
    return results, epochs_run


def finish(r: Setup, opt: argparse.Namespace, device: torch.device, info: DistInfo, results: tuple) -> tuple:
    """Strip the checkpoints, validate best.pt with plots, close the logger and print the summary line."""
    r.keeper.finish()
    best = r.keeper.best
    if best.exists() and not opt.noval:
        LOGGER.info(f"\nValidating {best}...")
        results = validate.evaluate(validation_copy(_load_for_val(best, device)), r.val_loader, r.data,
                                    compute_loss=r.compute_loss, single_cls=opt.single_cls, plots=not opt.noplots,
                                    save_dir=r.save_dir, verbose=True, progress=True).results
    r.logger.on_train_end()
    r.logger.close()
    if r.reference and best.exists() and not opt.noval:
        LOGGER.info(summary_line(r.reference, results))
    LOGGER.info(f"Results saved to {r.save_dir}")
    return results


def _load_for_val(path: Path, device: torch.device) -> nn.Module:
    return model_from_ckpt(torch_load(path), path).to(device)


def validation_copy(model: nn.Module) -> nn.Module:
    """What val.py will see when it loads the saved checkpoint: fp16-rounded, contiguous weights, fused, eval."""
    # contiguous, not the channels_last layout training runs in: oneDNN's NHWC and NCHW kernels round
    # differently (up to ~6e-4 on pixel boxes), which moved results.csv's mAP away from val.py's on best.pt
    m = make_contiguous(deepcopy(de_parallel(model)).half().float())
    return m.eval().fuse()


def build_criterion(kd: KDConfig, compute_loss: ComputeLoss, student: nn.Module, imgsz: int, forward: StudentForward,
                    trust: bool, unlabeled: UnlabeledStream | None = None, seed: int = 0) -> DetectionCriterion:
    """The loss the loop minimises: detection alone, or detection + distillation from the configured teacher
    (which also takes the unlabelled stream; `seed` initialises its feature adapters)."""
    if not kd.enabled:
        return DetectionCriterion(compute_loss, forward)
    return Distiller.build(kd, Student(student, compute_loss, forward, imgsz), trust=trust, unlabeled=unlabeled,
                           seed=seed)


def reference_scores(criterion: DetectionCriterion, model: nn.Module, opt, data: DatasetSpec,
                     val_loader) -> dict[str, float]:
    """mAP50-95 of the teacher (the student's ceiling) and of the starting student when it was loaded from a
    checkpoint, measured before the first step so the end of training can say what changed."""
    out: dict[str, float] = {}
    ceiling = criterion.reference_model()
    if ceiling is not None:
        name, ref_model = ceiling
        LOGGER.info(f"{name} on the validation set (the ceiling for the student):")
        r = validate.evaluate(deepcopy(ref_model).float(), val_loader, data, plots=False,
                              single_cls=opt.single_cls, half=False).results
        LOGGER.info(f"Teacher mAP50 {r[2]:.4f}, mAP50-95 {r[3]:.4f}")
        out["teacher"] = float(r[3])
    if str(opt.weights).endswith(".pt"):
        LOGGER.info(f"Student {opt.weights} before training:")
        r = validate.evaluate(validation_copy(model), val_loader, data, plots=False, single_cls=opt.single_cls,
                              half=False).results
        out["student"] = float(r[3])
    return out


def summary_line(reference: dict[str, float], results) -> str:
    """One line: the student's mAP50-95 before and after, next to the teacher's."""
    parts = [f"mAP50-95 {float(results[3]):.4f} after training"]
    if "student" in reference:
        parts.insert(0, f"student mAP50-95 {reference['student']:.4f} before")
    if "teacher" in reference:
        parts.append(f"teacher {reference['teacher']:.4f}")
    return "Summary: " + ", ".join(parts)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: YOLOv5's names and defaults plus the distillation flags; `cli_given` lists the
    options typed (by dest, whatever their spelling)."""
    opt = build_parser().parse_args(argv)
    opt.cli_given = sorted(typed_options(argv))
    return opt


def typed_options(argv: list[str] | None = None) -> set[str]:
    """The dests of the options the command line typed, spelt in any way (--img, an abbreviation, --no-amp):
    a second parse in which no option has a default, so only the typed ones land in the namespace."""
    probe = build_parser()
    for action in probe._actions:  # argparse has no public way to drop every default at once
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def flag_spellings() -> dict[str, str]:
    """Each option's dest -> its first flag (batch_size -> --batch-size), for messages that name typed options."""
    out: dict[str, str] = {}
    for a in build_parser()._actions:
        if a.option_strings:
            out.setdefault(a.dest, a.option_strings[0])  # --amp, not the later --no-amp
    return out


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: YOLOv5's names and defaults plus the distillation flags."""
    p = argparse.ArgumentParser(description="Train a YOLOv5 detector, optionally with output distillation.")
    p.add_argument("--weights", type=str, default="", help="initial weights path ('' = from scratch with --cfg)")
    p.add_argument("--cfg", type=str, default="", help="model yaml (yolov5n.yaml … resolve to models/)")
    p.add_argument("--data", type=str, default="shapes.yaml", help="dataset yaml (short names resolve to data/)")
    p.add_argument("--hyp", type=str, default=str(DEFAULT_HYP), help="hyperparameters yaml")
    p.add_argument("--epochs", type=int, default=100, help="total training epochs")
    p.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs/processes")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training")
    p.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD", help="optimizer")
    p.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    p.add_argument("--project", default=str(ROOT / "runs/train"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    p.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: backbone=10, first3=0 1 2")
    p.add_argument("--save-period", type=int, default=-1, help="save checkpoint every x epochs (disabled if < 1)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--evolve", type=int, nargs="?", const=300, default=None,
                   help="evolve the hyp yaml for x generations (default 300), see utils/training/evolve.py")
    p.add_argument("--amp", nargs="?", const="on", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = fp16 + GradScaler on CUDA, bf16 autocast on a CPU with native bf16, "
                        "fp32 elsewhere; --amp alone = on")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="fp32 training (--amp off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student's forward (skipped with a warning where unavailable)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of checkpoints you trust (runs code stored in the file)")
    add_kd_args(p)
    return p


def check_flags(opt: argparse.Namespace) -> None:
    """One-line errors for numeric flags out of range, before anything is built or written."""
    checks = (
        ("--epochs", opt.epochs, opt.epochs >= 1, ">= 1"),
        ("--batch-size", opt.batch_size, opt.batch_size >= 1, ">= 1 (AutoBatch, -1, is not supported)"),
        ("--imgsz", opt.imgsz, opt.imgsz >= 32, ">= 32"),
        ("--workers", opt.workers, opt.workers >= 0, ">= 0"),
        ("--patience", opt.patience, opt.patience >= 0, ">= 0 (0 disables early stopping)"),
        ("--label-smoothing", opt.label_smoothing, 0 <= opt.label_smoothing < 1, ">= 0 and < 1"),
        ("--freeze", opt.freeze, all(f >= 0 for f in opt.freeze), "layer numbers >= 0"),
    )
    for flag, value, ok, need in checks:
        if not ok:
            raise UserError(f"{flag} {value}: must be {need}")
    need, avail = batch_memory_need(opt.imgsz, opt.batch_size, opt.workers), available_memory()
    if avail is not None and need > avail:
        raise UserError(f"--imgsz {opt.imgsz}: one batch of {opt.batch_size} needs at least {need / 2**30:.1f} GiB "
                        f"for its mosaics and tensors, more than the {avail / 2**30:.1f} GiB available; lower "
                        f"--imgsz or --batch-size")


# the only options a resume takes from the command line: where it runs, not what it trains
RESUME_KEEPS = ("device", "workers", "trust_checkpoint")


def prepare_resume(opt: argparse.Namespace) -> argparse.Namespace:
    """Options of the run being resumed, after checking that it can be resumed; writes nothing.

    The run folder is the one that holds the file (<run>/weights/last.pt -> <run>), never the folder
    recorded inside it, so resuming a copy can never overwrite the original run."""
    last = Path(opt.resume if isinstance(opt.resume, str) else get_latest_run(ROOT / "runs"))
    if not str(last) or not last.is_file():
        raise UserError(f"--resume: no last.pt found{f' at {last}' if str(last) not in ('', '.') else ''}")
    if last.parent.name != "weights":
        raise UserError(f"--resume {last}: not inside a run's weights/ folder; a resumed run writes into "
                        f"<run>/weights/, so place the file there (or start a new run with --weights {last})")
    ckpt = torch_load(last, trust=opt.trust_checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("optimizer") is None or int(ckpt.get("epoch", -1)) < 0:
        raise UserError(f"--resume {last}: a finished or stripped checkpoint (no optimizer state), nothing to "
                        f"resume; start a new run with --weights {last}")
    run = last.parent.parent
    opt_yaml = run / "opt.yaml"
    d = read_yaml(opt_yaml, "run options") if opt_yaml.is_file() else dict(ckpt.get("opt") or {})
    keep = {k: getattr(opt, k) for k in RESUME_KEEPS}
    new = argparse.Namespace(**{**vars(opt), **d})
    new.cfg, new.weights, new.resume, new.save_dir = "", str(last), True, str(run)
    new.hyp = d.get("hyp", new.hyp)
    for k, v in keep.items():
        if k in opt.cli_given:
            setattr(new, k, v)
    # an edited or damaged record must not "resume" into a run that trains nothing and then strips last.pt
    ResumePoint.plan(ckpt, new.epochs, str(opt_yaml) if opt_yaml.is_file() else f"{last} (its recorded options)")
    if new.t_weights:
        check_teacher_unchanged(new.t_weights, getattr(new, "t_sha256", None))
    ignored = [k for k in opt.cli_given
               if k != "resume" and k not in RESUME_KEEPS and getattr(new, k, None) != getattr(opt, k)]
    if ignored:
        flags = flag_spellings()
        typed = (flags[k] + ("" if isinstance(getattr(opt, k), bool) else f" {getattr(opt, k)}") for k in ignored)
        LOGGER.warning(f"WARNING: --resume continues the run as recorded in {run}, so it ignores {', '.join(typed)} "
                       f"(it takes only {', '.join(flags[k] for k in RESUME_KEEPS)} from the command line)")
    return new


def resolve_run(opt: argparse.Namespace, hyp: dict) -> KDConfig:
    """A new run's distillation config (flag > hyp > default) with the teacher's sha256; --evolve resolves by it too."""
    kd = KDConfig.resolve(vars(opt), hyp, opt.cli_given, strict=True)
    return dataclasses.replace(kd, t_sha256=file_sha256(kd.t_weights)) if kd.enabled else kd


def run_record(hyp: dict, opt: argparse.Namespace, kd: KDConfig) -> tuple[dict, dict]:
    """(hyp, options) as a run records them in hyp.yaml, opt.yaml and its checkpoints: with the distillation
    config's values and the hyp in effect, keys in the order these files have always had (save_dir last)."""
    hyp_rec = {**hyp, **kd.hyp_values()}
    opt_rec = {k: v for k, v in vars(opt).items() if k != "save_dir"}
    # without a teacher no distillation setting is in effect: the options say so (the hyp keeps its keys, which
    # are only the defaults a run with a teacher would take)
    opt_rec.update((kd if kd.enabled else KDConfig()).as_dict())
    opt_rec["hyp"] = hyp_rec
    if "save_dir" in vars(opt):
        opt_rec["save_dir"] = opt.save_dir
    return hyp_rec, opt_rec


def main(argv: list[str] | None = None) -> int:
    """CLI entry: set up (DDP if launched by torchrun), train, and print user errors as one line."""
    opt = parse_opt(argv)
    info = dist_info_from_env()
    setup_logging(info.rank)
    try:
        # an official name (yolov5s.pt) that is not here is fetched into the current directory under that name,
        # so every later use of the value finds the file (under torchrun each rank fetches its own copy and
        # renames it into place whole: the same file, never a partial one)
        for w in (opt.weights, opt.t_weights):
            ensure_weights(w)
        if opt.evolve is not None:  # many trainings of train() with mutated hyps, into runs/evolve/exp*
            from utils.training.evolve import run_evolution
            check_flags(opt)
            validate.check_run_folder(opt.project, opt.name)
            return run_evolution(opt, info, train, resolve_run, KD_SPECS)
        if opt.resume:
            opt = prepare_resume(opt)
            hyp = load_hyp(opt.hyp, KD_SPECS)
            kd = KDConfig.from_record(vars(opt))
        else:
            check_flags(opt)
            validate.check_run_folder(opt.project, opt.name)
            hyp = load_hyp(opt.hyp, KD_SPECS)
            kd = resolve_run(opt, hyp)
            if kd.enabled:
                LOGGER.info(kd.summary(opt.cli_given, hyp, Path(opt.hyp).name))
            opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
        # from here on the distillation values live in `kd` alone; the files get them through run_record()
        hyp = {k: v for k, v in hyp.items() if k not in KD_HYP_KEYS}
        device = select_device(opt.device, opt.batch_size, info)
        init_distributed(info, device, opt.batch_size)
        try:
            train(hyp, opt, device, info, kd)
        finally:
            cleanup_distributed(info)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        print("Interrupted; the last saved checkpoint is intact (use --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
