"""The training loop: `train(cfg)` trains ROCK for exactly `cfg.num_iters` optimizer steps at the global batch.

Called by `rock_dist.train` (the command, under `accelerate launch` or plain `python`), and by the tests. One
iteration = one optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` images on each of the
W processes. The loop:

1. takes the step's K micro-batches from this rank's share of the WebDataset stream (split by rank in the pipeline —
   the stream is never passed through `accelerator.prepare`, docs/training.md), counts what each loss averages over and
   all-reduces the counts, so the loss is normalised over the global batch (`engine.normalization`);
2. forward + backward per micro-batch under `accelerator.accumulate` (DDP all-reduces only on the last one);
3. all-reduces the loss components together with a per-rank non-finite flag: a NaN/inf on ANY rank raises
   NonFiniteLossError on EVERY rank at this step, before the optimizer step and before any checkpoint;
4. clips gradients (optional), steps the optimizer, then the LR schedule (engine.lr_schedule, a function of the
   global iteration) exactly once; then updates the weights' moving average (`--ema_decay`, engine.ema);
5. logs to the experiment trackers (engine.trackers: TensorBoard, W&B, MLflow), evaluates on the val split (raw and
   EMA weights), stops early when val AP stopped improving (`--early_stopping_patience`, agreed by all ranks), and
   writes checkpoints and pictures on their schedules.

Steps 1 (counts) to 4 are one function, `engine.step.train_step`, on the parts `engine.step.build_step_parts` set up
per the fast path's training recipe (`engine.fast_path`); the benchmark and the `--auto_batch_size` probe run the
same function.

Resuming (`--checkpoint_path FILE|DIR|auto`) restores weights, EMA weights, optimizer, scheduler, grad scaler,
per-rank RNG states, the best val metric with the early-stopping count and the data position (the stream's global
sample position), then runs only the remaining iterations.

Supervision (docs/training.md, "What survives what" in the README): the run holds a lock on its save directory
(engine.run_lock); ranks started by a launcher exit when it dies (engine.supervision.ParentWatchdog); SIGTERM or
SIGUSR1 stops every rank at the next step boundary with a checkpoint (exit 143); a data error on any rank and a
failed save (full disk) stop every rank with the same one-line message.

Test-only hooks (environment variables, unset in normal use):
- `ROCK_DIST_FAULT_NONFINITE=STEP:RANK[,...]`: make the loss of global iteration STEP non-finite on RANK
  (see `engine.distributed`);
- `ROCK_DIST_RECORD_DIR=DIR`: every rank writes `DIR/rank{R}.json` at the end (world size, image ids it trained
  on per iteration, losses, lrs, SHA-256 digests of its final weights and buffers and of its EMA weights, whether
  early stopping ended the run), so launcher tests can check disjoint data and identical parameters across
  processes and machines.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from rock_dist.config import TrainConfig, to_dict
from rock_dist.config_file import RUN_CONFIG_NAME, write_config_file
from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine.console import EvalProgress, TrainConsole
from rock_dist.data.manifest import MANIFEST_NAME
from rock_dist.engine import run_lock
from rock_dist.engine.loader_watch import LoaderWatch
from rock_dist.engine.run_lock import RunLock
from rock_dist.engine.supervision import ParentWatchdog, StopRequest, under_launcher
from rock_dist.engine.lr_schedule import lr_factor
from rock_dist.engine.distributed import (FAULT_ENV, any_rank, broadcast_buffers, broadcast_object,
                                          gather_objects, host_all_reduce_sum, min_over_ranks,
                                          parse_fault_spec, state_digest)
from rock_dist.engine import memory
from rock_dist.engine.ema import ModelEma
from rock_dist.engine.fast_path import prepare_model_for_training
from rock_dist.engine.run_plan import (RunPlan, check_layout, eval_loader_spec, resolve_run_plan,
                                       train_loader_spec)
from rock_dist.engine.runtime import capture_rng_state, make_accelerator, restore_rng_state, seed_everything
from rock_dist.engine.step import StepParts, build_step_parts, train_step
from rock_dist.engine.normalization import reference_weights
from rock_dist.engine.task_weighting import build_task_weighting
from rock_dist.engine.tensorboard import eval_metric_scalars, prediction_pictures
from rock_dist.engine.trackers import RunTrackers, flat_hparams, log_with, missing_package, tracker_setup
from rock_dist.errors import CheckpointError, ConfigError, DataError, Preempted, RockError
from rock_dist.fsutil import atomic_write_json

RECORD_ENV = "ROCK_DIST_RECORD_DIR"
# Test hook: every BatchNorm normalises with its running statistics, so that one batch of 4, two micro-batches of 2
# and two ranks with 2 each compute the same function (batch statistics would differ) and can be compared exactly.
BN_EVAL_ENV = "ROCK_DIST_TEST_BN_EVAL"
# Architecture fields that must agree between a checkpoint and the flags of the run resuming it.
_ARCH_FIELDS = ("backbone", "no_rock", "aux_tasks", "image_size", "num_classes", "num_scenes")


@dataclass
class TrainState:
    """Progress that a checkpoint must carry to resume exactly."""

    step: int = 0  # completed optimizer steps (global iterations)
    samples_seen: int = 0  # the training stream's global position: samples all ranks have taken together
    best_metric: float | None = None  # best val AP@[.5:.95] of the raw weights so far
    best_step: int | None = None
    evals_since_best: int = 0  # validations since best_metric last improved (--early_stopping_patience)


@dataclass
class TrainResult:
    """What `train` returns on every rank."""

    step: int
    losses: list[float] = field(default_factory=list)  # global-batch loss of each iteration run here
    lrs: list[float] = field(default_factory=list)  # lr used by each iteration run here
    final_weights: Path | None = None
    metrics: dict[str, Any] | None = None  # last validation metrics
    ema_metrics: dict[str, Any] | None = None  # last validation metrics of the EMA weights (--ema_decay)
    final_ema_weights: Path | None = None
    early_stopped: bool = False  # --early_stopping_patience ended the run before --num_iters
    best_metric: float | None = None
    digest: str = ""  # SHA-256 of this rank's final weights and buffers
    ema_digest: str = ""  # the same of its EMA weights (--ema_decay)
    task_weights: dict[str, float] | None = None  # the adaptive auxiliary weights after the last step


# What reading the next training micro-batch raises for bad data: a corrupt shard, an unreadable file, a loader
# worker killed (RuntimeError from the DataLoader). Caught per rank, then agreed on by every rank.
STREAM_ERRORS = (RockError, OSError, ValueError, RuntimeError)


def _raise_every_rank(error: str | None, what: str) -> None:
    """Raise on every rank, once all know some rank failed, one DataError carrying every failing rank's message
    (collective: every rank calls it, `error` None on the ranks that did not fail)."""
    messages = [m for m in gather_objects(error) if m]
    raise DataError(f"{what}: " + "; ".join(messages))


def run_output(value: str, save_path: str, name: str) -> str:
    """An output directory flag: 'auto' means `save_path/name` (each run's logs live with its checkpoints, so two
    runs never share them), '' disables, anything else is used as given."""
    return str(Path(save_path) / name) if value == "auto" else value


def _main_state(state: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint state inside a write that `Trainer._main_writes` runs: only the main process runs those, and
    only there is `Trainer._checkpoint_state` not None."""
    if state is None:
        raise RuntimeError("a checkpoint write ran on a process other than the main one")
    return state


def resolve_val_path(val_path: str, train_path: str) -> str:
    """The validation split to use: `val_path` itself, or for "auto" the `val/` directory beside a `train_path`
    directory when it holds a manifest, else "" (no validation)."""
    if val_path != "auto":
        return val_path
    train = Path(train_path)
    if train.is_dir():
        sibling = train.parent / "val"
        if (sibling / MANIFEST_NAME).is_file():
            return str(sibling)
    return ""


class Trainer:
    """Owns everything one training run needs; `fit()` runs it, `train_step()` is one optimizer step."""

    def __init__(self, cfg: TrainConfig) -> None:
        from rock_dist.model.builder import build_criterion, build_model

        self.cfg = cfg  # the flags as given: never rewritten (what 'auto' became is in self.plan)
        # Device, precision, memory format, compile, the model against the shards' vocabulary, batch and layout:
        # resolved once (engine.run_plan); --auto_batch_size adds its probe's answer below.
        plan = resolve_run_plan(cfg)
        self.trackers_setup = tracker_setup(
            cfg.report_to, writer_path=run_output(cfg.writer_path, cfg.save_path, "tensorboard"),
            project=cfg.tracker_project, mlflow_tracking_uri=cfg.mlflow_tracking_uri, save_path=cfg.save_path)
        # Only the trained branches are built (builder), and the criterion uses every output whatever the batch,
        # so no parameter is ever without a gradient; DDP's unused-parameter search stays off (it costs a graph
        # traversal per step).
        self.accelerator = make_accelerator(plan, dist_timeout=cfg.dist_timeout, find_unused_parameters=False,
                                            log_with=log_with(self.trackers_setup))
        check_layout(plan, self.accelerator)
        acc = self.accelerator
        self.rank = plan.rank
        self.world_size = plan.world_size
        self.device = acc.device
        self.is_main = acc.is_main_process
        # Only the main process logs, so its packages decide; every rank stops with its message.
        self._on_main(self._check_tracker_packages, ConfigError)

        self.class_names, self.scene_types = list(plan.class_names), list(plan.scene_types)
        self.model_config = plan.model
        self.val_manifest = None
        self.val_path = resolve_val_path(cfg.data.val_path, cfg.data.train_path)
        if self.val_path:
            from rock_dist.data.manifest import load_manifest

            try:
                self.val_manifest = load_manifest(self.val_path)  # fail now, not after hours of training
            except DataError as err:
                raise DataError(f"--val_path: {err}") from err
        if cfg.early_stopping_patience and self.val_manifest is None:
            raise ConfigError(f"--early_stopping_patience {cfg.early_stopping_patience}: there is no validation "
                              f"split (--val_path {cfg.data.val_path!r}); give --val_path")

        resume_path = ckpt.resolve_resume_path(cfg.checkpoint_path, cfg.save_path) if cfg.checkpoint_path else None
        # A directory or `auto` without a checkpoint starts fresh (a requeued job's first start); say so.
        self.fresh_note = (f"--checkpoint_path {cfg.checkpoint_path}: no checkpoint in "
                           f"{cfg.save_path if cfg.checkpoint_path == ckpt.AUTO_RESUME else cfg.checkpoint_path}; "
                           "starting fresh") if cfg.checkpoint_path and resume_path is None else ""
        self.resume_data = ckpt.read_checkpoint(resume_path) if resume_path is not None else None
        if self.resume_data is not None:
            self._check_resume_compatible(self.resume_data, resume_path)
        # The fast path is defined once, in rock_dist.engine.fast_path and engine.step (the benchmark measures the
        # same code): channels_last per the plan, fused Adam, and with --fold_backbone_bn the frozen backbone BNs
        # folded into their convs (weights are saved unfolded by checkpoint.model_state).
        self.recipe = plan.training_recipe(fold_bn=cfg.fold_backbone_bn)
        self.plan: RunPlan = self._auto_batch_size(plan) if cfg.auto_batch_size else plan

        # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
        seed_everything(cfg.seed)
        model = build_model(self.model_config)
        criterion = build_criterion(self.model_config, cfg.loss)
        if self.resume_data is not None:
            model.load_state_dict(ckpt.strip_wrapper_prefixes(self.resume_data["model"]), strict=True)
        self.ema = self._build_ema(model)  # before build_step_parts, which sets `model` up in place
        self.parts: StepParts = build_step_parts(
            model, criterion, self.recipe, acc, lr=cfg.lr, weight_decay=cfg.weight_decay,
            clip_grad_norm=cfg.clip_grad_norm, lr_lambda=self.lr_factor)
        w = cfg.weighting
        weighting = build_task_weighting(
            w.task_weighting, self.model_config.tasks, reference_weights(cfg.loss), lr=w.task_weighting_lr,
            dwa_temperature=w.dwa_temperature, dwa_window=w.dwa_window, gradnorm_alpha=w.gradnorm_alpha)
        # Fixed weights need no per-step bookkeeping (and keep the criterion's own total, bit for bit).
        self.parts.weighting = weighting if w.task_weighting != "fixed" else None
        self.parts.faults = parse_fault_spec(os.environ.get(FAULT_ENV))
        self.parts.advice = (f" The last checkpoint in {cfg.save_path} is from before this iteration. Try a lower "
                             "--lr, --clip_grad_norm, or --mixed_precision no.")

        self.state = TrainState()
        self._resumed_layout: tuple[Any, Any] = (None, None)  # (world size, batch size) of the checkpoint
        if self.resume_data is not None:
            self._restore(self.resume_data)
        else:
            # Per-rank streams for anything random in the main process from here on.
            seed_everything(cfg.seed + 1_000_003 * (self.rank + 1))

        self.record_dir = os.environ.get(RECORD_ENV) or None
        self.manager = ckpt.CheckpointManager(cfg.save_path, cfg.keep_checkpoints)
        self.before_optimizer_step: Callable[[torch.nn.Module], None] | None = None  # diagnostics / tests
        self._stream: Any = None
        self._iter: Iterator[Mapping[str, torch.Tensor]] | None = None
        self._eval_loader: Any = None
        self.stop_request: StopRequest | None = None  # set while fit() runs
        self.loader_watch = LoaderWatch(samples_per_step=self.plan.batch_size * self.plan.accumulation_steps,
                                        num_workers=cfg.data.num_workers)

    @property
    def model(self) -> torch.nn.Module:
        return self.parts.model

    @property
    def target_size(self) -> tuple[int, int]:
        return self.plan.target_size

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch

    def _check_tracker_packages(self) -> None:
        problem = missing_package(self.trackers_setup.names)
        if problem:
            raise ConfigError(problem)

    def _build_ema(self, model: torch.nn.Module) -> ModelEma | None:
        """The moving average of --ema_decay: the checkpoint's EMA weights when resuming one that has them, else a
        copy of `model` (the initial or resumed weights), set up on the device as the trained model will be."""
        decay = self.cfg.ema_decay
        self.ema_note = ""
        if decay <= 0:
            return None
        stored = self.resume_data.get("ema") if self.resume_data is not None else None
        if self.resume_data is not None and stored is None:
            self.ema_note = "--ema_decay: the checkpoint has no EMA weights; the average starts from its weights"
        return ModelEma.copy_of(model, decay, stored=ckpt.strip_wrapper_prefixes(stored) if stored else None,
                                prepare=lambda m: prepare_model_for_training(m, self.recipe, self.device))

    def _train_mode(self) -> None:
        self.model.train()
        if os.environ.get(BN_EVAL_ENV) == "1":
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parts.optimizer

    @property
    def scheduler(self) -> Any:
        return self.parts.scheduler

    def _auto_batch_size(self, plan: RunPlan) -> RunPlan:
        """`--auto_batch_size`: the plan with the checkpoint's batch when resuming (the data position stays exact),
        else with the largest batch whose training step fits on this GPU times 0.9 (engine.memory), minimised over
        the ranks so that all agree."""
        reason = memory.max_batch_not_applicable(self.device)
        if reason is not None:
            raise ConfigError(f"--auto_batch_size: {reason}")
        if self.resume_data is not None and self.resume_data.get("batch_size"):
            return plan.with_batch_size(int(self.resume_data["batch_size"]), "checkpoint")
        found = memory.auto_train_batch_size(plan, self.cfg.loss, self.recipe, self.accelerator)
        agreed = min_over_ranks(found)
        if self.is_main:
            print(f"--auto_batch_size: {agreed} images per process (largest that fits x 0.9, minimum over "
                  f"{self.world_size} process(es))", flush=True)
        return plan.with_batch_size(agreed, "auto")

    # ------------------------------------------------------------------------------------------------ resuming
    def _check_resume_compatible(self, data: Mapping[str, Any], path: Path | None) -> None:
        stored = data["model_config"]
        if data.get("format") != ckpt.CHECKPOINT_FORMAT:
            raise ConfigError(f"--checkpoint_path {path}: a weights-only file cannot resume training (no optimizer "
                              "state); pass a training checkpoint")
        stored_fold = bool(data.get("train_config", {}).get("fold_backbone_bn", False))
        if stored_fold != self.cfg.fold_backbone_bn:
            # The optimizer state is laid out per parameter, and folding changes the parameters.
            raise ConfigError(f"--checkpoint_path {path}: it was trained with fold_backbone_bn={stored_fold} but this "
                              f"run has {self.cfg.fold_backbone_bn}; use the same --fold_backbone_bn setting to resume")
        weighting = (data.get("task_weighting") or {"name": "fixed"}).get("name")  # older checkpoints: fixed
        if weighting != self.cfg.weighting.task_weighting:
            # The strategy's state (learned log-variances, loss history, GradNorm scales) cannot carry over.
            raise ConfigError(f"--checkpoint_path {path}: it was trained with --task_weighting {weighting} but this "
                              f"run has {self.cfg.weighting.task_weighting}; use the same weighting to resume")
        for name in _ARCH_FIELDS:
            mine = getattr(self.model_config, name)
            theirs = stored.get(name)
            if isinstance(mine, tuple):
                theirs = tuple(tuple(v) if isinstance(v, list) else v for v in (theirs or ()))
            if mine != theirs:
                raise ConfigError(f"--checkpoint_path {path}: it was trained with {name}={theirs!r} but this run "
                                  f"has {name}={mine!r}; use the same model flags to resume")

    def _restore(self, data: Mapping[str, Any]) -> None:
        cfg = self.cfg
        self.optimizer.load_state_dict(data["optimizer"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and data.get("scaler") is not None:
            scaler.load_state_dict(data["scaler"])
        step = int(data["step"])
        self._apply_schedule_at(step)
        stored = data.get("task_weighting") or {"name": "fixed"}  # checkpoints from before task weighting: fixed
        if self.parts.weighting is not None:
            self.parts.weighting.load_state_dict(stored)
        same_layout = (data.get("world_size") == self.world_size and data.get("batch_size") == self.plan.batch_size)
        # The data position is global, so it carries over to another process count or batch size; whether the
        # stream can start exactly there depends on the data mode (see _resume_message).
        self.state = TrainState(step=step, samples_seen=ckpt.samples_seen_of(data),
                                best_metric=data.get("best_metric"), best_step=data.get("best_step"),
                                evals_since_best=int(data.get("evals_since_best") or 0))
        self._resumed_layout = (data.get("world_size"), data.get("batch_size"))
        rng = data.get("rng") or []
        if same_layout and self.rank < len(rng):
            restore_rng_state(rng[self.rank])
        else:
            seed_everything(cfg.seed + 1_000_003 * (self.rank + 1) + step)

    def lr_factor(self, step: int) -> float:
        """LR multiplier after `step` global iterations (engine.lr_schedule: a function of the step alone)."""
        cfg = self.cfg
        return lr_factor(step, schedule=cfg.lr_schedule, num_iters=cfg.num_iters,
                         milestones=cfg.scheduler_milestones, gamma=cfg.scheduler_gamma,
                         warmup_iters=cfg.warmup_iters)

    def _apply_schedule_at(self, step: int) -> None:
        """Put the optimizer at the LR and weight decay this run's flags give for `step`. The schedule is stateless,
        so this is all a resume needs: the same flags give the same floats as the uninterrupted run, and changed
        flags (a run extended with a later milestone, another --lr) take effect from the resumed iteration."""
        cfg = self.cfg
        self.scheduler.last_epoch = step
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["weight_decay"] = cfg.weight_decay
            group["lr"] = cfg.lr * self.lr_factor(step)

    # ------------------------------------------------------------------------------------------------ data
    def _open_stream(self) -> None:
        """Open this rank's training stream at the saved data position.

        The pipeline's stream is endless (it runs through its epochs by itself, equal steps per rank by plan), so
        the data position is the stream's global position: the samples all ranks have taken together
        (docs/data_pipeline.md: an exact continuation in indexed mode for any layout).
        """
        from rock_dist.data.pipeline import make_train_loader

        self._stream = make_train_loader(train_loader_spec(self.plan, self.cfg.data, self.cfg.seed, self.device),
                                         start_sample=self.state.samples_seen)
        self.loader_watch.num_workers = self._stream.num_workers
        self._iter = iter(self._stream)

    def _resume_message(self) -> str:
        """What a resumed run says about its data position (after the stream is open: it depends on the mode)."""
        st, stream = self.state, self._stream
        where = (f"resumed from step {st.step}; data: global sample {st.samples_seen} "
                 f"(epoch {st.samples_seen / stream.num_samples:.2f}, {stream.mode} mode)")
        old_world, old_batch = self._resumed_layout
        if (old_world, old_batch) == (self.world_size, self.plan.batch_size):
            return f"{where}; exact continuation"
        change = (f"checkpoint had {old_world} process(es) x batch {old_batch}, this run {self.world_size} x "
                  f"{self.plan.batch_size}")
        if stream.exact_resume:
            return f"{where}; {change}: the data continues exactly (no sample repeated or skipped), other RNG " \
                   "streams are re-seeded"
        return f"{where}; {change}: stream mode restarts at the nearest batch boundary (approximate)"

    @property
    def data_epoch(self) -> float:
        """Epochs of data seen so far (fractional), for the console."""
        total = int(getattr(self._stream, "num_samples", 0) or 0)
        return self.state.samples_seen / total if total else 0.0

    def _next_batch(self) -> Mapping[str, torch.Tensor]:
        """The next micro-batch of this rank; the time spent waiting for it feeds the loader-rate check."""
        assert self._iter is not None, "the training stream is started first"
        start = time.perf_counter()
        try:
            batch = next(self._iter)
        except StopIteration:
            raise DataError(f"rank {self.rank}: the training stream {self.cfg.data.train_path} ended; it should be "
                            "endless") from None
        self.loader_watch.waited(time.perf_counter() - start)
        self.state.samples_seen += self.plan.batch_size * self.world_size
        return batch

    def _open_stream_checked(self) -> Mapping[str, torch.Tensor]:
        """Open the stream and take the first micro-batch; a rank without data fails on ALL ranks, before training.

        The failing rank must still take part in the flag all-reduce: raising on it alone would leave the others
        waiting in their first DDP collective.
        """
        error: str | None = None
        first: Mapping[str, torch.Tensor] | None = None
        try:
            self._open_stream()
            first = self._next_batch()
        except (RockError, StopIteration, OSError, ValueError) as err:
            error = f"rank {self.rank}: {err}"
        if any_rank(error is not None, self.device):
            _raise_every_rank(error, "the training data failed on some process before training started")
        assert first is not None
        return first

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[Mapping[str, torch.Tensor]], step: int | None = None
                   ) -> dict[str, float]:
        """One optimizer step over this rank's K micro-batches: `engine.step.train_step` on this run's parts (the
        same function the benchmark and the batch-size probe time). `step` defaults to the next iteration."""
        values = train_step(self.parts, micro_batches, step=self.state.step + 1 if step is None else step,
                            before_optimizer_step=self.before_optimizer_step)
        if self.ema is not None:
            self.ema.update(ckpt.unwrap(self.model))  # every rank: the parameters are the same after the step
        return values

    # ------------------------------------------------------------------------------------------------ the run
    def fit(self) -> TrainResult:
        cfg = self.cfg
        st = self.state
        result = TrainResult(step=st.step, best_metric=st.best_metric)
        record_ids: list[list[int]] = []
        console = TrainConsole(enabled=self.is_main, verbose=not cfg.no_verbose, total_steps=cfg.num_iters,
                               start_step=st.step, log_every=cfg.train_eval_freq)
        lock = self._take_run_lock(console)  # before the first write of this run
        watchdog = ParentWatchdog().start() if under_launcher() else None
        trackers = RunTrackers(self.accelerator, self.trackers_setup)
        try:
            with console, StopRequest() as self.stop_request:
                self._announce(console)
                self._on_main(lambda: trackers.start(self._hparams()), ConfigError)
                resumed = self.resume_data is not None
                self.resume_data = None  # free the CPU copy of the weights
                if st.step >= cfg.num_iters:
                    console.always(f"checkpoint is at step {st.step} >= --num_iters {cfg.num_iters}: "
                                   "nothing left to train")
                elif self._early_stop_agreed():
                    result.early_stopped = True
                    console.always(f"{self._early_stop_reason()} at the checkpoint's step: nothing left to train "
                                   "(a larger --early_stopping_patience continues)")
                else:
                    if cfg.data.check_data:
                        self._check_training_data(console)
                    first = self._open_stream_checked()
                    if resumed:
                        console.always(self._resume_message())
                    self._train_mode()
                    self._loop(first, console, trackers, result, record_ids)
                broadcast_buffers(ckpt.unwrap(self.model))  # identical final weights on every rank
                if self.val_manifest is not None and result.metrics is None:
                    self._evaluate(console, trackers, result)  # resumed at the end: evaluate anyway
                result.final_weights = self._save_final(self.manager.final_weights_path, self.model)
                if self.ema is not None:
                    broadcast_buffers(self.ema.module)
                    result.final_ema_weights = self._save_final(self.manager.final_ema_weights_path,
                                                                self.ema.module)
        finally:
            trackers.close()
            if watchdog is not None:
                watchdog.stop()
            if lock is not None:
                lock.release()
        result.step = st.step
        result.best_metric = st.best_metric
        unwrapped = ckpt.unwrap(self.model)
        result.digest = state_digest(list(unwrapped.state_dict().items()))
        if self.ema is not None:
            result.ema_digest = state_digest(list(self.ema.module.state_dict().items()))
        if self.parts.weighting is not None:
            result.task_weights = self.parts.weighting.weights()
        summary = f"done: {st.step} iterations" + (" (stopped early)" if result.early_stopped else "")
        if result.metrics is not None:
            summary += f", val AP {100 * result.metrics['AP']:.2f} AP50 {100 * result.metrics['AP50']:.2f}"
        if result.ema_metrics is not None:
            summary += f", EMA val AP {100 * result.ema_metrics['AP']:.2f}"
        if st.best_metric is not None:
            summary += f", best AP {100 * st.best_metric:.2f} at step {st.best_step}"
        if result.final_weights is not None:
            summary += f"; weights: {result.final_weights}"
        console.always(summary)
        if self.record_dir:
            self._write_record(self.record_dir, result, record_ids)
        return result

    def _save_final(self, path: Path, model: torch.nn.Module) -> Path | None:
        """Final weights (the .pt and the portable pair) of `model`, written by the main process."""
        return self._main_writes(lambda: ckpt.save_weights(path, model, self.model_config, self.class_names,
                                                           self.scene_types, train_config=self.cfg,
                                                           iterations=self.state.step))

    def _hparams(self) -> dict[str, Any]:
        """The run's hyper-parameters for the trackers: every flag as given, and what the run plan made of them (the
        'auto' ones and the --auto_batch_size probe)."""
        plan = self.plan
        return {**flat_hparams(to_dict(self.cfg)), "run/world_size": self.world_size, "run/batch_size": plan.batch_size,
                "run/global_batch_size": plan.global_batch, "run/precision": plan.precision,
                "run/channels_last": plan.channels_last, "run/compile": plan.compile}

    def _announce(self, console: TrainConsole) -> None:
        cfg = self.cfg
        acc = self.accelerator
        for note in (self.fresh_note, self.ema_note):
            if note:
                console.always(note)
        console.print(
            f"rock_dist train: {self.world_size} process(es) ({acc.distributed_type.value}, {self.device}), "
            f"global batch {self.global_batch} = {self.plan.batch_size} x {self.plan.accumulation_steps} "
            f"accumulation x {self.world_size}, precision {self.plan.precision}, channels_last "
            f"{self.plan.channels_last}, compile {self.plan.compile}, model {self.model_config.describe()}, "
            f"{cfg.num_iters} iterations")

    def _eval_due(self, step: int) -> bool:
        f = self.cfg.val_eval_freq
        return self.val_manifest is not None and f > 0 and step % f == 0

    def _loop(self, first: Mapping[str, torch.Tensor], console: TrainConsole, trackers: RunTrackers,
              result: TrainResult, record_ids: list[list[int]]) -> None:
        cfg = self.cfg
        st = self.state
        pending: list[Mapping[str, torch.Tensor]] = [first]
        window: dict[str, float] = {}
        window_steps = 0
        window_start = time.perf_counter()
        step_start = window_start
        smooth_dt: float | None = None
        while st.step < cfg.num_iters:
            micro, error = pending, None
            position_at_step = st.samples_seen - len(pending) * self.plan.batch_size * self.world_size
            try:
                micro = pending + [self._next_batch() for _ in range(self.plan.accumulation_steps - len(pending))]
            except STREAM_ERRORS as err:
                # Agreed on below, so the other ranks stop with this message instead of waiting in a collective.
                error = f"rank {self.rank}: {err}"
            if self._stop_agreed(error, position_at_step):
                self._stop_for_preemption(console)
            pending = []
            values = self.train_step(micro, step=st.step + 1)
            st.step += 1
            result.losses.append(values["loss"])
            result.lrs.append(values["lr"])
            if self.record_dir:
                record_ids.append([int(i) for b in micro for i in b["image_id"].tolist()])

            now = time.perf_counter()
            dt = now - step_start
            step_start = now
            smooth_dt = dt if smooth_dt is None else 0.9 * smooth_dt + 0.1 * dt
            slow_loader = self.loader_watch.after_step(now)
            if slow_loader:
                console.always(slow_loader)
            for name, value in values.items():
                window[name] = window.get(name, 0.0) + value
            window_steps += 1
            shown = {n: window[n] / window_steps for n in window if n.startswith(("loss", "weight_"))}
            console.update(st.step, shown, values["lr"], 1.0 / smooth_dt, self.global_batch / smooth_dt)

            if st.step % max(1, cfg.train_eval_freq) == 0 or st.step == cfg.num_iters:
                elapsed = now - window_start
                scalars = {n: window[n] / window_steps for n in window}
                scalars["iterations_per_s"] = window_steps / elapsed
                scalars["images_per_s"] = window_steps * self.global_batch / elapsed
                trackers.scalars(scalars, st.step, prefix="train/")
                window, window_steps, window_start = {}, 0, now
            if trackers.takes_pictures and cfg.image_to_tb_freq > 0 and st.step % cfg.image_to_tb_freq == 0:
                self._log_pictures(trackers, micro[-1])
            if st.step == cfg.num_iters and cfg.precise_bn_batches > 0:
                self._recompute_batchnorm_stats(console)
                step_start = time.perf_counter()
            # The last iteration always evaluates (before its checkpoint, which then carries the best metric).
            evaluated = self._eval_due(st.step) or (st.step == cfg.num_iters and self.val_manifest is not None)
            if evaluated:
                self._evaluate(console, trackers, result)
                step_start = time.perf_counter()  # evaluation time is not training throughput
            stop = evaluated and self._early_stop_agreed()
            if (cfg.model_save_freq > 0 and st.step % cfg.model_save_freq == 0) or st.step == cfg.num_iters or stop:
                self._save_checkpoint(console)
                step_start = time.perf_counter()
            if stop:
                result.early_stopped = True
                console.always(f"{self._early_stop_reason()}: stopping at iteration {st.step} of {cfg.num_iters}")
                return

    def _recompute_batchnorm_stats(self, console: TrainConsole) -> None:
        """`--precise_bn_batches`: the final weights' BatchNorm statistics from fresh training micro-batches
        (engine/precise_bn.py), the same on every rank. The batches do not count as samples seen, so a resume from
        the final checkpoint reads the stream where the training steps left it."""
        from rock_dist.data.batch import prepare_batch
        from rock_dist.engine.precise_bn import average_batchnorm_stats, recompute_batchnorm_stats

        n = self.cfg.precise_bn_batches
        seen = self.state.samples_seen
        module = ckpt.unwrap(self.model)  # not through DDP, which would broadcast rank 0's buffers every forward
        failure: list[str] = []

        def batches() -> Iterator[Mapping[str, torch.Tensor]]:
            for _ in range(n):
                try:
                    yield self._next_batch()
                except STREAM_ERRORS as err:
                    failure.append(f"rank {self.rank}: {err}")
                    return

        def forward(batch: Mapping[str, torch.Tensor]) -> None:
            prepared = prepare_batch(batch, self.device, channels_last=self.plan.channels_last)
            with self.accelerator.autocast():
                module(prepared["images"])

        start = time.perf_counter()
        used = recompute_batchnorm_stats(module, batches(), forward, num_batches=n)
        self.state.samples_seen = seen
        if any_rank(bool(failure), self.device):  # agreed before the averaging collective
            _raise_every_rank(failure[0] if failure else None,
                              "the training data failed on some process while recomputing BatchNorm statistics")
        if self.world_size > 1:
            average_batchnorm_stats(module, lambda t: self.accelerator.reduce(t, "mean"))
        console.always(f"step {self.state.step}: BatchNorm statistics recomputed with the final weights over {used} "
                       f"micro-batch(es) per process ({time.perf_counter() - start:.1f} s)")

    # ------------------------------------------------------------------------------------------------ supervision
    def _take_run_lock(self, console: TrainConsole) -> RunLock | None:
        """The main process takes the save directory's lock (engine.run_lock) and removes temporary files that
        killed writers of earlier runs left; every rank stops with the same message when another run holds it."""
        def take() -> RunLock:
            lock = run_lock.acquire(self.cfg.save_path)
            if lock.note:
                console.always(lock.note)
            removed = ckpt.remove_stale_temps(self.cfg.save_path)
            if removed:
                console.always(f"removed {len(removed)} temporary file(s) of interrupted saves from "
                               f"{self.cfg.save_path} ({sum(size for _, size in removed) / 2**20:.1f} MiB): "
                               + ", ".join(name for name, _ in removed[:3]) + (", ..." if len(removed) > 3 else ""))
            # The resolved flags beside the checkpoints: `--config SAVE_PATH` repeats the run.
            write_config_file(Path(self.cfg.save_path) / RUN_CONFIG_NAME, to_dict(self.cfg),
                              "Flags of the training run that wrote this directory (rock_dist.train). Repeat it with\n"
                              f"python -m rock_dist.train --config {self.cfg.save_path} [--save_path NEW_DIR] ...")
            return lock

        return self._on_main(take, ConfigError)

    def _check_training_data(self, console: TrainConsole) -> None:
        """`--check_data`: the main process verifies every local split of --train_path (shards verify without
        decoding); every rank stops with the same list when anything is wrong."""
        from rock_dist.data.manifest import load_manifest
        from rock_dist.data.sources import load_sources
        from rock_dist.shards import verify_split

        def check() -> None:
            started = time.perf_counter()
            splits = sorted({src.manifest for src in load_sources(self.cfg.data.train_path)
                             if src.manifest and src.manifest != "remote"})
            problems = [p for manifest_path in splits for p in verify_split(load_manifest(manifest_path),
                                                                            decode=False)]
            console.always(f"--check_data: {len(splits)} split(s) checked in {time.perf_counter() - started:.1f}s, "
                           f"{len(problems)} problem(s)")
            if problems:
                shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                raise DataError(f"--check_data: the training data has {len(problems)} problem(s): {shown}")

        self._on_main(check, DataError)

    def _stop_agreed(self, data_error: str | None, position_at_step: int) -> bool:
        """Agree across ranks, before the step's first collective, on a stop request (True on every rank if any
        rank got a stop signal) and on data errors (raised on every rank with every failing rank's message).

        `position_at_step`: the data position before this step's micro-batches; a stop gives them back (it is
        rewound), so the checkpoint resumes with exactly these batches. A stop wins over a data error: a signal
        sent to the whole process group also kills the loader workers, and the checkpoint is still exact."""
        stop = self.stop_request is not None and self.stop_request.requested
        failing = data_error is not None
        if self.world_size > 1:
            flags = torch.zeros(2 * self.world_size)
            flags[self.rank] = float(failing)
            flags[self.world_size + self.rank] = float(stop)
            reduced = host_all_reduce_sum(flags).tolist()  # on the host: no wait for the GPU's queue
            failing = any(reduced[:self.world_size])
            stop = any(reduced[self.world_size:])
        if failing and not stop:
            _raise_every_rank(data_error, f"training data failed at iteration {self.state.step + 1}")
        if stop:
            self.state.samples_seen = position_at_step
        return stop

    def _stop_for_preemption(self, console: TrainConsole) -> None:
        """Write the checkpoint of the step reached on every rank's agreement, then stop with exit status 143."""
        self._save_checkpoint(console)
        raise Preempted(f"stop signal received: checkpoint of iteration {self.state.step} written to "
                        f"{self.manager.path_for(self.state.step)}; resume with --checkpoint_path "
                        f"{self.cfg.save_path}")

    # ------------------------------------------------------------------------------------------------ side jobs
    def _log_pictures(self, trackers: RunTrackers, batch: Mapping[str, torch.Tensor]) -> None:
        from rock_dist.data.batch import prepare_batch

        prepared = prepare_batch(batch, self.device, channels_last=self.plan.channels_last)
        pictures = prediction_pictures(ckpt.unwrap_detector(self.model), batch["images"], prepared["images"], prepared,
                                       class_names=self.class_names, scene_types=self.scene_types,
                                       loss_config=self.cfg.loss, autocast=self.accelerator.autocast)
        trackers.images(pictures, self.state.step)

    def _evaluate(self, console: TrainConsole, trackers: RunTrackers, result: TrainResult) -> None:
        """Validate the raw weights (and the EMA weights) into `result`, log them, and count the validation for
        the best checkpoint and early stopping (on the raw weights' AP@[.5:.95], the same on every rank)."""
        cfg = self.cfg
        result.metrics = metrics = self._validate(self.model, "val", console, trackers)
        self._train_mode()
        if self.ema is not None:
            result.ema_metrics = self._validate(self.ema.module, "val_ema", console, trackers)
        ap = float(metrics["AP"])
        st = self.state
        if st.best_metric is not None and not ap > st.best_metric:
            st.evals_since_best += 1
            return
        st.best_metric, st.best_step, st.evals_since_best = ap, st.step, 0
        if cfg.save_best_on_val:
            state = self._checkpoint_state()
            if self._main_writes(lambda: self.manager.save_best(_main_state(state))) is not None:
                console.print(f"step {st.step}: new best val AP {100 * ap:.2f} -> {self.manager.best_path}")

    def _validate(self, model: torch.nn.Module, name: str, console: TrainConsole,
                  trackers: RunTrackers) -> dict[str, Any]:
        """Evaluate `model` on the val split, logged as `name/`; its COCO JSON under coco/stepNNNNNNN[_ema]."""
        from rock_dist.data.pipeline import make_eval_loader
        from rock_dist.engine.evaluation import evaluate

        cfg = self.cfg
        broadcast_buffers(ckpt.unwrap(model))  # every rank evaluates the same network
        if self._eval_loader is None:  # re-iterable, with persistent workers: build it once per run
            self._eval_loader = make_eval_loader(eval_loader_spec(self.plan, self.val_path, cfg.data.num_workers))
        loader = self._eval_loader
        coco_dir = run_output(cfg.coco_json_save_path, cfg.save_path, "coco")
        suffix = name[len("val"):]
        out_dir = Path(coco_dir) / f"step{self.state.step:07d}{suffix}" if coco_dir else None
        # Its own progress lines: on a slow CPU the end-of-run validation takes minutes after the last step.
        with EvalProgress(f"step {self.state.step}: validating{' (EMA weights)' if suffix else ''}",
                          getattr(loader, "num_samples", None), enabled=console.verbose,
                          inside=console if console.use_bar else None) as progress:
            metrics = evaluate(model, loader, self.accelerator, loss_config=cfg.loss, out_dir=out_dir,
                               class_names=self.class_names, progress=progress.advance,
                               expected_images=self.val_manifest.num_samples if self.val_manifest else None)
        trackers.scalars(eval_metric_scalars(metrics), self.state.step, prefix=f"{name}/")
        console.print(f"step {self.state.step}: {name} AP {100 * metrics['AP']:.2f} AP50 "
                      f"{100 * metrics['AP50']:.2f} ({metrics.get('num_images', '?')} images)")
        return metrics

    def _early_stop_agreed(self) -> bool:
        """Whether --early_stopping_patience validations in a row brought no better val AP; the same answer on every
        rank (each decides from the same metrics, and one flag all-reduce makes sure)."""
        patience = self.cfg.early_stopping_patience
        if not patience:
            return False
        return any_rank(self.state.evals_since_best >= patience, self.device)

    def _early_stop_reason(self) -> str:
        st = self.state
        best = f"{100 * st.best_metric:.2f} at iteration {st.best_step}" if st.best_metric is not None else "none"
        return (f"early stopping: val AP has not improved for {st.evals_since_best} validation(s) (best {best}; "
                f"--early_stopping_patience {self.cfg.early_stopping_patience})")

    def _checkpoint_state(self) -> dict[str, Any] | None:
        """The checkpoint dict on the main process, None elsewhere (collective: every rank must call it, since each
        contributes its RNG state; only the main process pays for the CPU copy of weights and optimizer state)."""
        broadcast_buffers(ckpt.unwrap(self.model))
        if self.ema is not None:
            broadcast_buffers(self.ema.module)
        rng_states = gather_objects(capture_rng_state())
        if not self.is_main:
            return None
        st = self.state
        return ckpt.training_checkpoint(
            model=self.model, model_config=self.model_config, class_names=self.class_names,
            scene_types=self.scene_types, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=getattr(self.accelerator, "scaler", None), step=st.step, samples_seen=st.samples_seen,
            data_mode=getattr(self._stream, "mode", self.cfg.data.data_mode), world_size=self.world_size,
            batch_size=self.plan.batch_size, gradient_accumulation_steps=self.plan.accumulation_steps,
            rng_states=rng_states,
            train_config=to_dict(self.cfg), best_metric=st.best_metric, best_step=st.best_step,
            task_weighting=self.parts.weighting.state_dict() if self.parts.weighting is not None else None,
            evals_since_best=st.evals_since_best, ema=self.ema.module if self.ema is not None else None,
            ema_decay=self.cfg.ema_decay)

    def _save_checkpoint(self, console: TrainConsole) -> None:
        state = self._checkpoint_state()
        path = self._main_writes(lambda: self.manager.save(_main_state(state), self.state.step))
        if path is not None:
            console.print(f"step {self.state.step}: checkpoint {path}")

    def _main_writes(self, write: Callable[[], Path]) -> Path | None:
        """A file write on the main process whose failure (full disk) every rank raises: the others would otherwise
        die in the next collective with a lost-connection trace. Also the barrier after every save."""
        return self._on_main(write, CheckpointError)

    def _on_main(self, job: Callable[[], Any], error_type: type[RockError]) -> Any:
        """Run `job` on the main process only (None elsewhere) and agree on its outcome: a RockError there is
        raised as `error_type` with the same message on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = job()
            except RockError as err:
                error = str(err)
        error = broadcast_object(error)
        if error:
            raise error_type(error)
        return result

    def _write_record(self, record_dir: str, result: TrainResult, record_ids: list[list[int]]) -> None:
        acc = self.accelerator
        atomic_write_json(Path(record_dir) / f"rank{self.rank}.json", {
            "rank": self.rank, "world_size": self.world_size, "distributed_type": str(acc.distributed_type.value),
            "device": str(self.device), "precision": self.plan.precision,
            "local_process_index": acc.local_process_index, "step": result.step, "losses": result.losses,
            "lrs": result.lrs, "image_ids": record_ids, "digest": result.digest, "task_weights": result.task_weights,
            "ema_digest": result.ema_digest, "early_stopped": result.early_stopped,
            "final_weights": str(result.final_weights) if result.final_weights else None,
        })


def train(cfg: TrainConfig) -> TrainResult:
    """Train per `cfg` (see module docstring); returns on every rank after the final weights are written."""
    return Trainer(cfg).fit()


__all__ = ["TrainState", "TrainResult", "Trainer", "train", "RECORD_ENV", "BN_EVAL_ENV"]
