"""Experiment trackers of a training run (TensorBoard, Weights & Biases, MLflow) through Accelerate's tracker API.

Called by `rock_dist.engine.trainer` only. `tracker_setup` turns the flags (`--report_to`, `--writer_path`,
`--tracker_project`, `--mlflow_tracking_uri`) into a `TrackerSetup`; `log_with(setup)` is what the trainer's
Accelerator is built with (`engine.runtime.make_accelerator`); `missing_package` names what to install for a chosen
tracker. `RunTrackers` then starts them with the run's flags as hyper-parameters (`accelerator.init_trackers`), logs
scalars through `accelerator.log`, sends the prediction pictures (`engine.tensorboard.prediction_pictures`) to each
tracker's own writer or run, since Accelerate's `log` takes scalars only, and finishes them.

Only the main process logs: the trainer starts the trackers there only (`RunTrackers.start`, its failure agreed by
every rank), so everything else here is a no-op on the other processes (docs/training.md).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

_INSTALL = {"tensorboard": "pip install tensorboard",
            "wandb": "pip install 'rock_dist[wandb]' (or pip install wandb)",
            "mlflow": "pip install 'rock_dist[mlflow]' (or pip install mlflow-skinny)"}


@dataclass(frozen=True)
class TrackerSetup:
    """The trackers a run reports to and where (flags resolved)."""

    names: tuple[str, ...]  # in --report_to order, without 'none' and repeats
    writer_path: str  # TensorBoard's log directory ('' when TensorBoard is not used)
    project: str  # W&B project, MLflow experiment
    run_name: str  # W&B and MLflow run name: the save directory's name
    mlflow_uri: str
    save_path: str


def tracker_setup(report_to: tuple[str, ...], *, writer_path: str, project: str, mlflow_tracking_uri: str,
                  save_path: str) -> TrackerSetup:
    """Resolve the tracker flags. `writer_path` is already resolved ('auto' -> SAVE_PATH/tensorboard); an empty one
    leaves TensorBoard out, as it disabled TensorBoard before trackers were configurable."""
    names = tuple(dict.fromkeys(n for n in report_to if n != "none" and (n != "tensorboard" or writer_path)))
    uri = mlflow_tracking_uri
    if uri == "auto":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(save_path) / "mlruns").resolve().as_uri()
    return TrackerSetup(names=names, writer_path=writer_path if "tensorboard" in names else "", project=project,
                        run_name=Path(save_path).resolve().name, mlflow_uri=uri, save_path=save_path)


def missing_package(names: tuple[str, ...]) -> str | None:
    """One message naming the flag and what to install, for the first chosen tracker whose package is missing (None
    when all are there). Accelerate itself would leave such a tracker out with a debug message only."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    for name in names:
        if not available[name]():
            return f"--report_to {name}: the {name} package is not installed; {_INSTALL[name]}, or leave {name} out " \
                   "of --report_to"
    return None


def log_with(setup: TrackerSetup) -> list[Any] | None:
    """The Accelerator's `log_with` for `setup` (None: no tracker)."""
    from accelerate.tracking import TensorBoardTracker

    # TensorBoard as an instance: by name, Accelerate would log to LOGGING_DIR/PROJECT, and --writer_path is the log
    # directory itself (the run's event files stay where they always were).
    trackers = [TensorBoardTracker("", setup.writer_path) if name == "tensorboard" else name for name in setup.names]
    return trackers or None


def flat_hparams(values: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """A nested config dict (`config.to_dict`) as one level of flag name -> scalar or string, the types every tracker
    takes as hyper-parameters: sections are flattened (flag names are unique across them), lists become the
    space-separated form of the command line, None the empty string."""
    out: dict[str, str | int | float | bool] = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat_hparams(value))
        elif isinstance(value, (list, tuple)):
            out[name] = " ".join(map(str, value))
        elif value is None:
            out[name] = ""
        else:
            out[name] = value
    return out


def _tensorboard_pictures(writer: Any, pictures: Mapping[str, torch.Tensor], step: int, prefix: str) -> None:
    for name, picture in pictures.items():
        writer.add_image(f"{prefix}{name}", picture, step, dataformats="CHW")


def _mlflow_pictures(run: Any, pictures: Mapping[str, torch.Tensor], step: int, prefix: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()  # the tracking URI RunTrackers.start set
    for name, picture in pictures.items():
        # One artifact folder per step: MLflow keeps artifacts by path, so each step's pictures stay.
        client.log_image(run.info.run_id, picture.permute(1, 2, 0).numpy(),
                         artifact_file=f"{prefix}step{step:07d}/{name}.png")


def _wandb_pictures(run: Any, pictures: Mapping[str, torch.Tensor], step: int, prefix: str) -> None:
    import wandb

    run.log({f"{prefix}{name}": wandb.Image(picture.permute(1, 2, 0).numpy()) for name, picture in pictures.items()},
            step=step)


_PICTURES: dict[str, Callable[[Any, Mapping[str, torch.Tensor], int, str], None]] = {
    "tensorboard": _tensorboard_pictures, "mlflow": _mlflow_pictures, "wandb": _wandb_pictures}


class RunTrackers:
    """The run's trackers on an Accelerator built with `log_with(setup)`; every method is a no-op until `start` (so
    on every process but the main one, and without trackers)."""

    def __init__(self, accelerator: Any, setup: TrackerSetup) -> None:
        self.accelerator = accelerator
        self.setup = setup
        self.started = False

    def start(self, hparams: Mapping[str, Any]) -> None:
        """Start every tracker and log `hparams` once; on the main process only (no collective inside). Any failure
        (an unreachable tracking server, a W&B login missing) is one ConfigError naming --report_to."""
        from rock_dist.errors import ConfigError

        setup = self.setup
        if not setup.names:
            return
        try:
            if "mlflow" in setup.names:
                import mlflow

                if setup.mlflow_uri.startswith("file:") or "://" not in setup.mlflow_uri:
                    # MLflow 3 refuses a local file store unless this is set; mlflow-skinny has no database store
                    # (no SQLAlchemy), so a file store is the one local choice it offers.
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri(setup.mlflow_uri)
            self.accelerator.init_trackers(
                setup.project, config=dict(hparams),
                init_kwargs={"mlflow": {"run_name": setup.run_name},
                             "wandb": {"name": setup.run_name, "dir": setup.save_path}})
        except Exception as err:  # whatever the tracker package raises, as one line
            for tracker in self.accelerator.trackers:
                with contextlib.suppress(Exception):  # those after the failing one never started
                    tracker.finish()
            self.accelerator.trackers.clear()
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"--report_to {' '.join(setup.names)}: starting the trackers failed "
                              f"({type(err).__name__}: {first})") from err
        self.started = True

    @property
    def takes_pictures(self) -> bool:
        """Whether pictures sent here reach a tracker (the caller makes them only then)."""
        return self.started

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.started:
            self.accelerator.log({f"{prefix}{name}": float(value) for name, value in values.items()}, step=step)

    def images(self, pictures: Mapping[str, torch.Tensor], step: int, prefix: str = "images/") -> None:
        """`pictures`: name -> uint8 3 x H x W CPU tensors, sent to every tracker in its own image form."""
        if not self.takes_pictures:
            return
        for name in self.setup.names:
            _PICTURES[name](self.accelerator.get_tracker(name, unwrap=True), pictures, step, prefix)

    def close(self) -> None:
        """Finish every tracker (flush and close the writers, end the runs). Not `accelerator.end_training()`: that
        also destroys the process group, which belongs to whoever started the processes (train() returns to its
        caller on every rank, and on an error path another rank may still be inside a collective)."""
        trackers, self.started = list(self.accelerator.trackers), False
        self.accelerator.trackers.clear()
        for tracker in trackers:
            tracker.finish()


__all__ = ["TrackerSetup", "tracker_setup", "missing_package", "log_with", "flat_hparams",
           "RunTrackers"]
