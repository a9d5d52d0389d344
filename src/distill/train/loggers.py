"""Metric loggers beside ``metrics.jsonl``: TensorBoard and MLflow, both optional extras.

``fit(..., loggers=["tensorboard", "mlflow"])`` (or logger objects, or ``{"name": ..., **options}``)
sends each epoch's metrics row, the one written to ``metrics.jsonl``, to every logger with the
epoch as the step, on the main process only, and closes them when training ends. In a recipe:
``train: {loggers: [tensorboard]}``; on the command line: ``distill run R.yaml --logger tensorboard``.

Any object with ``log_metrics(metrics, step)`` and ``close()`` is a :class:`Logger`. Named ones:

- ``"tensorboard"``: :class:`TensorBoardLogger` writing event files to ``RUN_DIR/tensorboard``
  (option ``log_dir``); needs the ``tensorboard`` package (``pip install 'distill[log]'``).
- ``"mlflow"``: :class:`MLflowLogger`, one MLflow run per run folder (options ``tracking_uri``,
  ``experiment``, ``run_name``); needs ``mlflow`` or ``mlflow-skinny`` (``pip install 'distill[log]'``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from distill.files import atomic_write_json, read_json
from distill.integrations import require

__all__ = ["LOGGERS", "Logger", "MLflowLogger", "TensorBoardLogger", "check_loggers", "close_loggers", "log_row",
           "make_loggers", "scalars"]

# name -> (the options it takes, the package it needs)
LOGGERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("log_dir",), "tensorboard"),
    "mlflow": (("tracking_uri", "experiment", "run_name"), "mlflow"),
}


@runtime_checkable
class Logger(Protocol):
    """Receives one metrics mapping per epoch; ``close`` ends it (a later ``log_metrics`` may reopen it)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (ints and floats, not ``epoch`` itself nor booleans) as floats."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``).

    The writer opens at the first :meth:`log_metrics` and is flushed after each, so a running
    ``tensorboard --logdir`` shows every finished epoch.
    """

    def __init__(self, log_dir: str | Path) -> None:
        require("tensorboard", "log", "the tensorboard logger")
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for key, value in scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MLflowLogger:
    """Metrics to one MLflow run, through ``MlflowClient`` (no global active run is touched).

    Args:
        tracking_uri: where the tracking server or store is (``None``: MLflow's default, the
            ``MLFLOW_TRACKING_URI`` environment variable or ``./mlruns``).
        experiment: the experiment's name (created when absent); default ``"distill"``.
        run_name: the run's name in the MLflow UI.
        run_id_file: a JSON file remembering the run's id: a resumed training (the same file,
            the same tracking URI) logs into the same MLflow run instead of starting another.

    Non-finite values are sent as they are (MLflow stores NaN); the run is marked finished by
    :meth:`close`.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 run_id_file: str | Path | None = None) -> None:
        require("mlflow", "log", "the mlflow logger")
        self.tracking_uri = tracking_uri
        self.experiment = experiment or "distill"
        self.run_name = run_name
        self.run_id_file = Path(run_id_file) if run_id_file is not None else None
        self.run_id: str | None = None
        self._client: Any = None

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None and self.run_id_file is not None and self.run_id_file.is_file():
            saved = read_json(self.run_id_file, "the MLflow run of this run folder")
            if saved.get("tracking_uri") == self._client.tracking_uri:
                self.run_id = saved["run_id"]
        if self.run_id is None:
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(self.experiment)
            self.run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
            if self.run_id_file is not None:
                atomic_write_json(self.run_id_file, {"tracking_uri": self._client.tracking_uri, "run_id": self.run_id})
        else:
            self._client.update_run(self.run_id, status="RUNNING")

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._client is None:
            self._open()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=v, timestamp=now, step=int(step)) for k, v in scalars(metrics).items()]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id)
            self._client = None


def _named(spec: Any) -> tuple[str, dict[str, Any]] | None:
    """``"name"`` or ``{"name": ..., **options}`` -> (name, options); ``None`` for a logger object."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a logger given as a mapping needs a 'name' ({', '.join(LOGGERS)}), got {dict(spec)!r}")
        return name, options
    if isinstance(spec, Logger):
        return None
    raise TypeError(f"a logger is a name ({', '.join(map(repr, LOGGERS))}), a mapping with 'name', or an object with "
                    f"log_metrics(metrics, step) and close(); got {type(spec).__name__}")


def check_loggers(specs: Sequence[Any] | None, *, run_dir: str | Path | None = None,
                  run_dir_known: bool | None = None) -> None:
    """Validate logger specs before any work: known names and options, the package installed,
    a run folder for a TensorBoard logger without ``log_dir``. Raises ``ValueError``,
    ``TypeError`` or :class:`~distill.integrations.MissingExtraError`."""
    if specs is None:
        return
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise TypeError(f"loggers must be a list (e.g. ['tensorboard']), got {specs!r}")
    has_dir = run_dir is not None if run_dir_known is None else run_dir_known
    for spec in specs:
        named = _named(spec)
        if named is None:
            continue
        name, options = named
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; known: {', '.join(LOGGERS)} (metrics.jsonl is always written)")
        allowed, package = LOGGERS[name]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"logger {name!r}: unknown options {unknown}; it takes {list(allowed)}")
        bad = {k: v for k, v in options.items() if v is not None and not isinstance(v, (str, Path))}
        if bad:
            raise TypeError(f"logger {name!r}: options must be strings, got {bad}")
        if name == "tensorboard" and options.get("log_dir") is None and not has_dir:
            raise ValueError("logger 'tensorboard' writes to RUN_DIR/tensorboard: give fit a run_dir, or a log_dir "
                             "({'name': 'tensorboard', 'log_dir': PATH})")
        require(package, "log", f"the {name} logger")


def make_loggers(specs: Sequence[Any] | None, run_dir: str | Path | None = None) -> list[Logger]:
    """The loggers of ``specs`` (see :func:`check_loggers`); named ones write beside ``run_dir``:
    TensorBoard to ``RUN_DIR/tensorboard``, MLflow to a run named after the run folder, in the
    experiment named after its parent (a recipe's name), its id kept in ``RUN_DIR/mlflow_run.json``."""
    check_loggers(specs, run_dir=run_dir)
    out: list[Logger] = []
    run_path = Path(run_dir) if run_dir is not None else None
    for spec in specs or ():
        named = _named(spec)
        if named is None:
            out.append(spec)
            continue
        name, options = named
        if name == "tensorboard":
            out.append(TensorBoardLogger(options.get("log_dir") or run_path / "tensorboard"))  # type: ignore[operator]
        else:
            out.append(MLflowLogger(
                tracking_uri=options.get("tracking_uri"),
                experiment=options.get("experiment") or (run_path.parent.name if run_path is not None else None),
                run_name=options.get("run_name") or (run_path.name if run_path is not None else None),
                run_id_file=run_path / "mlflow_run.json" if run_path is not None else None))
    return out


def log_row(loggers: Sequence[Logger], row: Mapping[str, Any], step: int | None = None) -> None:
    """Send one metrics row to every logger, the step being ``row["epoch"]`` unless given."""
    if step is None:
        epoch = row.get("epoch", 0)
        step = int(epoch) if isinstance(epoch, (int, float)) and math.isfinite(epoch) else 0
    for logger in loggers:
        logger.log_metrics(row, step)


def close_loggers(loggers: Sequence[Logger]) -> None:
    """Close every logger, even when one of them fails (the first error is raised afterwards)."""
    error: BaseException | None = None
    for logger in loggers:
        try:
            logger.close()
        except Exception as e:  # keep closing the others
            error = error or e
    if error is not None:
        raise error
