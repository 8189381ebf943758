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


def test_importing_pycolmap_keeps_the_processs_sigterm_handler():
    """COLMAP installs glog's signal handler at import: a SIGTERM then printed a stack dump and ended the process
    before a run or script could remove its temporary files."""
    import subprocess
    import sys

    pytest.importorskip("pycolmap")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    code = ("import os, signal, sys; sys.path.insert(0, os.getcwd()); "
            "signal.signal(signal.SIGTERM, lambda s, f: print('handled', flush=True)); "
            "from datasets.colmap_model import import_pycolmap; import_pycolmap(); "
            "os.kill(os.getpid(), signal.SIGTERM); print('alive', flush=True)")  # a plain import: a stack dump, dead
    kept = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert kept.returncode == 0 and kept.stdout.split() == ["handled", "alive"], kept.stderr[-1000:]


def test_sigterm_in_a_test_stops_after_the_view_and_in_the_export_at_once(tmp_path):
    """Outside training SIGTERM is StopOnSignal's: during the views it is noted and the test stops after the view
    under way; in the export that follows the last view (video trajectory, video, mesh: a minute or more on a
    CPU) nothing ends to stop after, so on one device it stops there at once, and the atomic writer under way
    removes its temporary file."""
    from types import SimpleNamespace

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from utils.callbacks import StopOnSignal
    from utils.io import atomic_path

    trainer = SimpleNamespace(state=SimpleNamespace(fn="test"), is_global_zero=True, world_size=1)
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    stop.on_test_start(trainer, None)
    stop.on_test_batch_end(trainer, None, None, None, 0)  # no signal: the test goes on
    os.kill(os.getpid(), signal.SIGTERM)  # during a view: noted only
    assert stop.received == "SIGTERM"
    with pytest.raises(SIGTERMException):
        stop.on_test_batch_end(trainer, None, None, None, 1)
    stop.on_exception(trainer, None, SIGTERMException())  # as Lightning calls it: the handler is put back
    assert signal.getsignal(signal.SIGTERM) is before

    stop = StopOnSignal()
    stop.on_test_start(trainer, None)
    stop.on_test_epoch_end(trainer, None)
    with pytest.raises(SIGTERMException):
        with atomic_path(str(tmp_path / "video.mp4")) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half a video")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert os.listdir(tmp_path) == []
    stop.on_exception(trainer, None, SIGTERMException())
    assert signal.getsignal(signal.SIGTERM) is before

    stop = StopOnSignal()  # a signal between the last view's check and the export: the export does not start
    stop.on_test_start(trainer, None)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        stop.on_test_epoch_end(trainer, None)
    stop.on_exception(trainer, None, SIGTERMException())

    stop = StopOnSignal()  # on several devices rank 0 exports alone: its export is not cut
    several = SimpleNamespace(state=SimpleNamespace(fn="test"), is_global_zero=True, world_size=2)
    stop.on_test_start(several, None)
    stop.on_test_epoch_end(several, None)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGTERM"
    stop.on_test_end(several, None)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("script", ["eval_mesh", "gen_cameras", "imgs2poses", "tsdf_fusion"])
def test_a_scripts_help_gives_its_commands_and_layouts(script, capsys):
    """``--help`` showed the docstring's first line only; the commands to type, the folders read and written and
    what each option does are in the rest of it."""
    import importlib

    module = importlib.import_module(f"scripts.{script}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    commands = [line.strip() for line in module.__doc__.splitlines() if line.strip().startswith("python scripts/")]
    assert commands and all(command in shown for command in commands), shown
    assert "``" not in shown  # the docstring's reST quoting is left out
    last_paragraph = module.__doc__.strip().split("\n\n")[-1].replace("``", "").split()
    assert " ".join(last_paragraph) in " ".join(shown.split()), shown
