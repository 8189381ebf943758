"""A script stopped by Ctrl-C or SIGTERM (a job scheduler's stop): one line, a shell's exit status, and no
half-written folder; SIGTERM's own handler is put back afterwards."""
import os
import signal
import time

import pytest

from utils.io import atomic_folder
from utils.stops import stops_cleanly


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"),
                                              (signal.SIGINT, 130, "SIGINT (Ctrl-C)")])
def test_a_stopped_script_cleans_up_and_says_so(tmp_path, capsys, sig, status, name):
    before = signal.getsignal(signal.SIGTERM)

    @stops_cleanly("demo-script")
    def main(argv=None) -> int:
        with atomic_folder(str(tmp_path / "scene")) as tmp:
            with open(os.path.join(tmp, "half.txt"), "w") as f:
                f.write("half")
            os.kill(os.getpid(), sig)  # Python's default for SIGTERM ended the process here, leaving .tmp-*
            time.sleep(5)
        return 0

    assert main() == status
    assert capsys.readouterr().err == f"demo-script: stopped by {name}; nothing half-written was left.\n"
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before
