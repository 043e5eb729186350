"""train.py and eval.py report a user's mistake as one line and exit status 2, without a traceback."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_wrong_target_path_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-model"
    commands = {
        "train": [
            "train.py",
            "--config",
            "configs/gemma4_e2b.py",
            "--workdir",
            str(tmp_path / "train"),
            f"--config.target.hf_path={missing}",
        ],
        "eval": [
            "eval.py",
            "--config",
            "configs/gemma4_e2b.py",
            "--workdir",
            str(tmp_path / "eval"),
            f"--config.target.hf_path={missing}",
        ],
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in commands.items()
    }
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and "Traceback" not in stderr, (name, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(missing / "config.json") in last, (name, last)
    assert not (tmp_path / "train" / "target.json").exists()  # nothing recorded about a target that is not there
