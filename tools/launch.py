r"""Start a multi-process run on this machine: N local processes on 127.0.0.1.

  python -m tools.launch --num_processes=2 --devices_per_process=4 -- \
      python -m hstu.train --dataset=ml-100k --data_dir=DIR --preset=hstu-ml --out=runs/x

Each process runs the command with `--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` appended (`eval.distributed`), and, with
`--devices_per_process`, that many fake XLA:CPU devices (for tests and laptops). Their
output is passed through, each line prefixed `[I]`. When one process fails the others
are stopped; the exit status is the first failure's (0 when all succeed; 128 + N for a
process killed by signal N, as a shell reports it).

On a cluster, start one process per host with the cluster's own launcher instead; JAX
finds the coordinator itself (README: SLURM `srun`, Cloud TPU `--worker=all`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

POLL_S = 0.2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int | None) -> dict[str, str]:
    """This environment, with `devices` fake CPU devices when set."""
    env = dict(os.environ)
    if devices is not None:
        kept = [
            f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
        ]
        env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    return env


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


def _relay(index: int, stream) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int | None = None,
           port: int = 0) -> int:  # fmt: skip
    """Runs `command` as `num_processes` coordinated processes; the exit status."""
    if not command:
        raise app.UsageError("no command: put it after `--`, e.g. -- python -m hstu.train ...")
    address = f"127.0.0.1:{port or free_port()}"
    env = process_env(devices_per_process)
    procs, relays = [], []
    for i in range(num_processes):
        args = [*command, f"--coordinator_address={address}", f"--num_processes={num_processes}",
                f"--process_id={i}"]  # fmt: skip
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        relay = threading.Thread(target=_relay, args=(i, proc.stdout), daemon=True)
        relay.start()
        procs.append(proc)
        relays.append(relay)
    status = 0
    while [p.poll() for p in procs].count(None):  # every process polled, each round
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed:
            status = _status(failed[0])
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(POLL_S)
    for p, relay in zip(procs, relays, strict=True):
        p.wait()
        relay.join()
        status = status or _status(p.returncode)
    return status


def _define_flags() -> None:
    flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
    flags.DEFINE_integer(
        "devices_per_process", None, "Fake XLA:CPU devices per process (default: the platform's)."
    )
    flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).", lower_bound=0)


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    sys.exit(launch(argv[1:], f.num_processes, f.devices_per_process, f.port))


if __name__ == "__main__":
    _define_flags()
    app.run(main)  # not eval.cli.run: that would join a run with these same flag names
