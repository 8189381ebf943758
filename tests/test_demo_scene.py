"""The embedded demo scene's folder: rendered once, rendered again when a file of it is missing, and never put in
place of a folder that holds something else."""
import json
import os

import pytest

from datasets.base import DatasetError
from datasets.synthetic import ensure_demo_scene


def test_a_demo_render_missing_a_file_is_rendered_again_and_a_whole_one_is_kept(tmp_path):
    root = str(tmp_path / "demo-dtu")
    ensure_demo_scene(root, resolution=16, layout="dtu")
    with open(os.path.join(root, "demo_scene.json")) as f:
        files = json.load(f)["files"]
    assert "cameras_sphere.npz" in files and len([f for f in files if f.startswith("image")]) == 48
    image = os.path.join(root, files[-1])
    written_at = os.stat(image).st_mtime_ns
    ensure_demo_scene(root, resolution=16, layout="dtu")  # whole: left as it is
    assert os.stat(image).st_mtime_ns == written_at

    os.remove(os.path.join(root, "cameras_sphere.npz"))  # before: "set dataset.cameras_file", with no way out
    os.remove(image)
    ensure_demo_scene(root, resolution=16, layout="dtu")
    assert all(os.path.isfile(os.path.join(root, name)) for name in files)


def test_the_demo_refuses_a_folder_of_other_files_and_leaves_it_as_it_was(tmp_path):
    """A dataset.root_dir pointed at the user's own scene with a demo config deleted that scene before."""
    root = tmp_path / "my_capture"
    (root / "images").mkdir(parents=True)
    (root / "images" / "0001.jpg").write_bytes(b"not a demo file")
    with pytest.raises(DatasetError, match="not the demo scene"):
        ensure_demo_scene(str(root), resolution=16, layout="blender")
    assert (root / "images" / "0001.jpg").read_bytes() == b"not a demo file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_capture"]  # no temporary left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_demo_scene(str(empty), resolution=16, layout="blender")  # an empty folder is the demo's to fill
    assert (empty / "transforms_train.json").is_file()


def test_a_demo_render_to_redo_keeps_a_file_the_user_added(tmp_path):
    """A render to redo (a file of it gone, or an older version) replaces the folder whole: not with the user's
    file in it."""
    root = tmp_path / "demo"
    ensure_demo_scene(str(root), resolution=16, layout="blender")
    (root / "notes.txt").write_text("mine")
    (root / ".DS_Store").write_bytes(b"")  # a file browser's: not the user's work
    ensure_demo_scene(str(root), resolution=16, layout="blender")  # whole: nothing to redo, no question asked
    os.remove(root / "transforms_test.json")
    with pytest.raises(DatasetError, match=r"did not write \(notes.txt\)"):
        ensure_demo_scene(str(root), resolution=16, layout="blender")
    assert (root / "notes.txt").read_text() == "mine"
    os.remove(root / "notes.txt")
    ensure_demo_scene(str(root), resolution=16, layout="blender")
    assert (root / "transforms_test.json").is_file()


def render_counting(root, barrier, results):
    """A run started with others (spawned): ensure the demo scene once all are ready; report whether it rendered."""
    import datasets.synthetic as synthetic

    rendered = []
    real_write = synthetic.write_blender

    def counted_write(*args, **kwargs):
        rendered.append(True)
        return real_write(*args, **kwargs)

    synthetic.write_blender = counted_write
    barrier.wait()
    try:
        synthetic.ensure_demo_scene(root, resolution=32, layout="blender")
        with open(os.path.join(root, "demo_scene.json")) as f:
            whole = all(os.path.isfile(os.path.join(root, name)) for name in json.load(f)["files"])
        results.put(("rendered" if rendered else "reused", whole))
    except Exception as err:
        results.put((f"{type(err).__name__}: {err}", False))


def test_runs_started_together_render_the_demo_once_and_all_find_it_whole(tmp_path):
    """A sweep started on a fresh checkout: each run rendered the scene and replaced the others' render, one of
    them failing with 'Directory not empty' when two replaced it at once (1 time in 3 with 6 runs)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fresh interpreters, as separate launch.py runs are
    runs = 3
    barrier, results = context.Barrier(runs), context.Queue()
    root = str(tmp_path / "demo")
    processes = [context.Process(target=render_counting, args=(root, barrier, results)) for _ in range(runs)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert outcomes == [("rendered", True)] + [("reused", True)] * (runs - 1)
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no render left beside it
