"""train.py and eval.py report a user's mistake as one line and exit status 2, without a traceback."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_users_mistake_is_one_line_and_exit_2(tmp_path, embedded_cache):
    missing = tmp_path / "no-such-model"
    # name: (command, what the last line must name)
    commands = {
        "train, a wrong target path": (
            [
                "train.py",
                "--config",
                "configs/gemma4_e2b.py",
                "--workdir",
                str(tmp_path / "train"),
                f"--config.target.hf_path={missing}",
            ],
            str(missing / "config.json"),
        ),
        "eval, a wrong target path": (
            [
                "eval.py",
                "--config",
                "configs/gemma4_e2b.py",
                "--workdir",
                str(tmp_path / "eval"),
                f"--config.target.hf_path={missing}",
            ],
            str(missing / "config.json"),
        ),
        "train, a batch that does not split over the mesh": (
            [
                "train.py",
                "--config",
                "configs/tiny.py:test",
                "--workdir",
                str(tmp_path / "batch"),
                "--config.batch_size=3",
                "--config.mesh.fsdp=2",
            ],
            "batch_size=3 is not divisible by the data-parallel mesh size 2",
        ),
    }
    env = os.environ | {"MTP_CACHE": str(embedded_cache)}  # the session's embedded target: nothing is trained
    running = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for name, (args, _) in commands.items()
    }
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and "Traceback" not in stderr, (name, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and commands[name][1] in last, (name, last)
    assert not (tmp_path / "train" / "target.json").exists()  # nothing recorded about a target that is not there
    assert not (tmp_path / "batch" / "checkpoints").exists()
