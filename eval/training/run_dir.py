"""The run folder (`--out`) every trainer writes, and its guards.

    run.json            {"package", "config": the flags that define the run, "info": ...}
    metrics.jsonl       train / valid records (eval.training.metrics_log)
    tensorboard/
    checkpoints/latest  resumable state (eval.training.checkpoints)
    checkpoints/best    selected state
    result.json         written last: the run is finished

`RunDir` takes an exclusive lock on `<out>/.lock` (released by the kernel if the process
dies), so two runs cannot write one folder. Reopening a folder compares the new `config`
with `run.json` and refuses differing flags by name; `overwrite=True` starts over. A
folder with `result.json` is a finished run: its result is returned, never rewritten.
In a multi-process run (`eval.distributed`) process 0 does all of this; the others wait
for it, then read `run.json` and write nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
from typing import Any

from eval.distributed import barrier, is_primary
from eval.errors import MissingFileError, UserError
from eval.io import atomic_write_json
from eval.training.metrics_log import METRICS_FILE, plain

RUN_FILE, RESULT_FILE, LOCK_FILE = "run.json", "result.json", ".lock"
_RUN_OUTPUTS = ("checkpoints", "tensorboard", METRICS_FILE, RESULT_FILE, RUN_FILE)


class RunLockedError(UserError, RuntimeError):
    """Another process is writing the run folder."""


class RunMismatchError(UserError, ValueError):
    """The run folder holds a run started with other flags."""


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes `value` (NumPy / JAX numbers as plain ones) as JSON, atomically."""
    atomic_write_json(path, plain(value), indent=1, default=float)


def input_path(path: str | os.PathLike | None) -> str | None:
    """An input's path as run.json records it: absolute, `..` and links resolved, so the same
    folder reached two ways is the same flag value when a rerun is compared with run.json."""
    return str(pathlib.Path(path).resolve()) if path else None


def read_run(path: str | pathlib.Path) -> dict[str, Any]:
    """`run.json` of a run folder; FileNotFoundError naming the folder when absent."""
    file = pathlib.Path(path) / RUN_FILE
    if not file.is_file():
        raise MissingFileError(f"--run={path}: no {RUN_FILE} (is it a training --out folder?)")
    return json.loads(file.read_text())


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(plain(value), default=float))


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys (`train.learning_rate`)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name: old -> new` for every (dotted) key whose value differs."""
    old, new = _flat(_normalised(old)), _flat(_normalised(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


class RunDir:
    """An open run folder (see module doc); use as a context manager or call `close`."""

    def __init__(
        self,
        path: str | pathlib.Path,
        package: str,
        config: dict[str, Any],
        *,
        info: dict[str, Any] | None = None,
        overwrite: bool = False,
        outputs: tuple[str, ...] = (),
    ):
        """`config`: compared with run.json on reopening; `info`: recorded, not compared;
        `outputs`: the package's own files / folders, deleted with the run by `overwrite`."""
        self.path = pathlib.Path(path).absolute()
        self.package, self.config = package, _normalised(config)
        self.primary = is_primary()
        if not self.primary:
            barrier(f"run folder {self.path}")  # process 0 has checked and set it up
            self._lock = None
            self.info = json.loads((self.path / RUN_FILE).read_text())["info"]
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 (closed in close())
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise RunLockedError(
                f"--out={self.path}: another run (pid {holder}) is writing this folder; wait for "
                "it to finish or choose another --out"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        if overwrite:
            for name in (*_RUN_OUTPUTS, *outputs):
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run_file = self.path / RUN_FILE
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            diff = config_diff(old.get("config", {}), self.config)
            if old.get("package") != package or diff:
                self.close()
                what = "; ".join(diff) or f"package {old.get('package')!r} -> {package!r}"
                raise RunMismatchError(
                    f"--out={self.path} holds a run started with other flags ({what}); pass "
                    "--overwrite to start over, or choose another --out"
                )
            self.info = {**old.get("info", {}), **(info or {})}
        else:
            self.info = dict(info or {})
        self.write_run()
        barrier(f"run folder {self.path}")

    def write_run(self) -> None:
        """(Re)writes run.json with the current `info` (process 0 only)."""
        if not self.primary:
            return
        write_json(
            self.path / RUN_FILE,
            {"package": self.package, "config": self.config, "info": self.info},
        )

    @property
    def result(self) -> dict[str, Any] | None:
        """The finished run's result.json, or None while the run is unfinished."""
        file = self.path / RESULT_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    def write_result(self, result: dict[str, Any]) -> None:
        if self.primary:
            write_json(self.path / RESULT_FILE, result)

    def close(self) -> None:
        if self._lock is not None and not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
