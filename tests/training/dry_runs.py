"""The full-size dry runs that tests/training/test_configs.py checks, run as users run them
(``python train.py --config configs/NAME.py --workdir W --dry_run`` on 8 simulated devices), one after another in
the background from the moment the tests are collected (tests/conftest.py): each compiles for a minute or more,
which a 2-core machine then does beside the other tests instead of before them."""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable

ROOT = pathlib.Path(__file__).parents[2]
# Per-device budget for arguments + temporaries: an 80 GB H100 or a 95 GB v5p for the large targets, with headroom.
BUDGET_GIB = {"gemma4_e2b": 24, "gemma4_e4b": 24, "gemma4_26b_a4b": 40, "gemma4_31b": 40}
TIMEOUT_SECONDS = 600

_started: dict[str, "DryRun"] = {}
_workdirs: list[str] = []


class DryRun:
    """One config's dry run in a child process; ``result()`` waits for its JSON line."""

    def __init__(self, name: str):
        self.name, self.done, self.process, self.output, self.error = name, threading.Event(), None, None, None

    def run(self, workdir: str) -> None:
        command = [sys.executable, "train.py", f"--config=configs/{self.name}.py", f"--workdir={workdir}", "--dry_run"]
        command = ["nice", "-n", "10", *command]  # the tests in the foreground come first
        env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        try:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            stdout, stderr = self.process.communicate(timeout=TIMEOUT_SECONDS)
            if self.process.returncode == 0:
                self.output = json.loads(stdout.strip().splitlines()[-1])
            else:
                self.error = f"{' '.join(command)} exited with {self.process.returncode}:\n{stderr[-3000:]}"
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            self.process.kill()
            self.error = f"{' '.join(command)}: {e!r}"
        finally:
            self.done.set()

    def result(self) -> dict:
        self.done.wait()
        if self.error:
            raise AssertionError(self.error)
        return self.output


def start(names: Iterable[str] = BUDGET_GIB) -> dict[str, DryRun]:
    """Starts these configs' dry runs (once per session: later calls return the first call's), one after another on
    a background thread."""
    if not _started:
        _started.update({name: DryRun(name) for name in sorted(names)})
        workdir = tempfile.mkdtemp(prefix="mtp_dry_run_")
        _workdirs.append(workdir)

        def run_all():
            for dry_run in _started.values():
                dry_run.run(workdir)

        threading.Thread(target=run_all, name="dry runs", daemon=True).start()
    return _started


def _stop_children() -> None:  # an interrupted session leaves no compiling process and no workdir behind
    for dry_run in _started.values():
        if dry_run.process is not None and dry_run.process.poll() is None:
            dry_run.process.kill()
            dry_run.process.wait()
    for workdir in _workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


atexit.register(_stop_children)
