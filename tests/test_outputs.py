"""Output folders: nothing lost (two writers race for one folder; a folder that appears meanwhile is never replaced;
--overwrite never leaves both or neither) and failing before the work (read-only, a file in the way, no room)."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llmprune.outputs as outputs
import llmprune.pipeline as pipeline
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.models import checkpoint_params, model_bytes, save_pretrained_atomic
from llmprune.outputs import (LOCK_NAME, check_output_dir, human_bytes, rename_noreplace, reserve_output_dir,
                              write_output_dir)

from conftest import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PRUNE = ["--method", "magnitude", "--eval-ppl", "none", "--device", "cpu", "-q"]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _one_line_error(err: str) -> str:
    """The CLI's one error line (progress bars drawn in this process may precede it), and no traceback."""
    lines = [line for line in re.split(r"[\r\n]", err) if "llmprune: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("llmprune: error:"), err
    return lines[0].strip()


def _leftovers(parent: Path) -> list[str]:
    """Temporary, backup or lock files left beside or inside the outputs."""
    found = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    return found + [str(p) for p in parent.glob(f"*/{LOCK_NAME}")]


def _no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(pipeline, "load_model", fail)


# ---------------------------------------------------------------- 1. nothing lost

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from llmprune import cli, pipeline

    d, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    load = pipeline.load_model

    def load_model(*a, **k):  # past the start check: wait until the other run is past it too, or gone
        (d / f"working-{me}").touch()
        t = time.time()
        while not ((d / f"working-{other}").exists() or (d / f"exit-{other}").exists()) and time.time() - t < 60:
            time.sleep(0.01)
        return load(*a, **k)

    pipeline.load_model = load_model
    (d / f"ready-{me}").touch()  # barrier: both processes start their run at the same moment
    while not (d / f"ready-{other}").exists():
        time.sleep(0.005)
    try:
        rc = cli.main(sys.argv[4:])
    finally:
        (d / f"exit-{me}").touch()
    sys.exit(rc)
""")


def test_two_runs_racing_for_one_output_folder_one_wins_the_other_refuses(tiny_model_dir, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out = tmp_path / "runs" / "out"
    procs = {s: subprocess.Popen([sys.executable, str(child), str(sync), s, {"0.3": "0.6", "0.6": "0.3"}[s],
                                  "--model", str(tiny_model_dir), "--output-dir", str(out), "--sparsity", s, *PRUNE],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for s in ("0.3", "0.6")}
    res = {s: (p.wait(timeout=300), *p.communicate()) for s, p in procs.items()}
    codes = sorted(rc for rc, _, _ in res.values())
    assert codes == [0, 2], res
    winner = next(s for s, r in res.items() if r[0] == 0)
    loser = next(s for s, r in res.items() if r[0] == 2)
    err = _one_line_error(res[loser][2])
    assert str(out) in err and ("being written by another llmprune run" in err or "not empty" in err), err
    assert f"saved: {out}" in res[winner][1]
    rec = json.loads((out / "llmprune.json").read_text())  # the surviving folder is complete and is the winner's
    assert rec["config"]["prune"]["sparsity"] == float(winner)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert _leftovers(out.parent) == []


RENAME_CHILD = textwrap.dedent("""
    import sys, time, types
    from pathlib import Path
    pkg = types.ModuleType("llmprune")  # llmprune.outputs alone, without the package's torch import
    pkg.__path__ = [sys.argv[7]]
    sys.modules["llmprune"] = pkg
    import llmprune.outputs as o

    sync, src, dst, me, other, native = Path(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:7]
    if native == "0":
        o._renameat2 = None  # the portable path: mkdir-claim, then rename onto it
    (sync / f"ready-{me}").touch()
    while not (sync / f"ready-{other}").exists():
        time.sleep(0.001)
    try:
        o.rename_noreplace(src, dst)
    except FileExistsError:
        sys.exit(3)
    sys.exit(0)
""")


@pytest.mark.parametrize("native", ["1", "0"], ids=["renameat2", "mkdir-claim"])
def test_no_replace_rename_race_between_two_processes(tmp_path, native):
    if native == "1" and outputs._renameat2 is None:
        pytest.skip("renameat2 is not available on this platform (the portable path is tested beside)")
    (tmp_path / "sync").mkdir()
    child = tmp_path / "child.py"
    child.write_text(RENAME_CHILD)
    dst = tmp_path / "out"
    procs = []
    for me, other in (("a", "b"), ("b", "a")):
        src = tmp_path / f"new-{me}"
        src.mkdir()
        (src / "who").write_text(me)
        procs.append(subprocess.Popen([sys.executable, str(child), str(tmp_path / "sync"), str(src), str(dst), me,
                                       other, native, str(REPO / "llmprune")], env=_env()))
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes == [0, 3]
    who = (dst / "who").read_text()
    assert not (tmp_path / f"new-{who}").exists() and (tmp_path / f"new-{'ab'.replace(who, '')}" / "who").is_file()
    assert [p.name for p in dst.iterdir()] == ["who"]


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "mkdir-claim"])
def test_no_replace_rename_refuses_an_empty_folder_too(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr(outputs, "_renameat2", None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("new")
    dst.mkdir()  # os.rename would silently replace an empty folder
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert (src / "f").read_text() == "new" and list(dst.iterdir()) == []


def _save(out, reservation=None, overwrite=False, marker="new"):
    tok = tiny_tokenizer()
    return save_pretrained_atomic(tiny_model(vocab_size=len(tok)), tok, out, {"llmprune.json": {"marker": marker}},
                                  overwrite=overwrite, reservation=reservation)


def test_a_folder_that_appeared_meanwhile_is_not_replaced_and_the_work_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    with reserve_output_dir(out) as r:
        assert (out / LOCK_NAME).is_file()
        shutil.rmtree(out)  # someone else takes the name while the run works
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        with pytest.raises(LLMPruneError) as e:
            _save(out, r)
    msg = str(e.value)
    assert "replaced by someone else" in msg and len(msg.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and (out / "theirs.txt").read_text() == "theirs"
    kept = Path(msg.rsplit(" is in ", 1)[1])
    assert kept.parent == tmp_path and kept.name.startswith("out.unsaved-")
    assert json.loads((kept / "llmprune.json").read_text()) == {"marker": "new"}
    assert (kept / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_files_put_into_the_reserved_folder_are_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    with reserve_output_dir(out) as r:
        (out / "notes.txt").write_text("mine")
        with pytest.raises(LLMPruneError, match=r"files appeared in output folder .* \(notes.txt\)"):
            _save(out, r)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # our lock went away, their file stayed


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "out"
    with reserve_output_dir(out):
        for attempt in (lambda: check_output_dir(out), lambda: reserve_output_dir(out, overwrite=True),
                        lambda: _save(out, overwrite=True)):
            with pytest.raises(LLMPruneError, match=rf"being written by another llmprune run \(pid {os.getpid()}"):
                attempt()
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not out.exists()  # the reservation made the folder, and removes it while it is empty


def test_a_lock_left_by_a_killed_run_is_named_and_not_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "out"
    out.mkdir()
    import socket

    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "token": "x"}))
    for overwrite in (False, True):
        with pytest.raises(LLMPruneError) as e:
            reserve_output_dir(out, overwrite)
        assert f"no longer running (pid {pid}" in str(e.value) and f"delete {out / LOCK_NAME}" in str(e.value)
    assert json.loads((out / LOCK_NAME).read_text())["token"] == "x"


@pytest.mark.parametrize("native", [True, False], ids=["renameat2-exchange", "aside-in-delete"])
def test_overwrite_replaces_the_old_folder_whole(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr(outputs, "_renameat2", None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LLMPruneError, match="exists and is not empty"):
        _save(out)
    _save(out, overwrite=True)
    assert json.loads((out / "llmprune.json").read_text()) == {"marker": "new"} and not (out / "old.txt").exists()
    assert _leftovers(tmp_path) == []


def test_overwrite_whose_final_rename_fails_keeps_the_old_folder_and_names_the_new(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2", None)  # the two-step path, where a failure is possible between

    def fails(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(outputs, "rename_noreplace", fails)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LLMPruneError) as e:
        _save(out, overwrite=True)
    msg = str(e.value)
    assert "could not put" in msg and len(msg.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # put back, without our lock
    new = Path(msg.rsplit(" is in ", 1)[1])
    assert json.loads((new / "llmprune.json").read_text()) == {"marker": "new"}  # and the new one is not lost


# ---------------------------------------------------------------- 2. fail before the work

def _mount_tmpfs(d: Path, opts: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    d.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True).returncode == 0


def _umount(d: Path) -> None:
    subprocess.run(["umount", str(d)], capture_output=True)


@pytest.fixture(params=["read-only-filesystem", "no-write-permission", "statvfs-says-read-only"])
def unwritable_dir(request, tmp_path, monkeypatch):
    """A folder nothing can be written into, made as real as this machine allows."""
    d = tmp_path / "ro"
    if request.param == "read-only-filesystem":
        if not _mount_tmpfs(d, "ro,size=1m"):
            pytest.skip("cannot mount a tmpfs here (the statvfs case covers the read-only check)")
        yield d, "read-only filesystem"
        _umount(d)
    elif request.param == "no-write-permission":
        d.mkdir()
        if os.geteuid() != 0:
            d.chmod(0o555)
            yield d, "not writable"
            d.chmod(0o755)
        else:  # root ignores permission bits, not the immutable attribute
            if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
                pytest.skip("running as root without chattr (the statvfs case covers the check)")
            yield d, "not writable"
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    else:
        d.mkdir()
        real = os.statvfs

        class RO:
            def __init__(self, st):
                self.f_flag = st.f_flag | os.ST_RDONLY

        monkeypatch.setattr(outputs.os, "statvfs", lambda p: RO(real(p)) if Path(p) == d else real(p))
        yield d, "read-only filesystem"


def test_unwritable_output_folder_fails_before_the_model_loads(tiny_model_dir, unwritable_dir, monkeypatch, capsys):
    d, reason = unwritable_dir
    _no_model_load(monkeypatch)
    for argv in (["--model", str(tiny_model_dir), "--output-dir", str(d / "pruned"), *PRUNE],
                 ["eval", "--model", str(tiny_model_dir), "--output", str(d / "res"), "-q"],
                 ["sweep", "--model", str(tiny_model_dir), "--output-dir", str(d / "sw"), "-q"],
                 ["push", str(tiny_model_dir), "me/tiny", "--dry-run", str(d / "dry"), "-q"],
                 ["reproduce", str(REPO / "recipes" / "smollm2" / "table.yaml"), "--out-dir", str(d / "rep"), "-q"]):
        assert main(argv) == 2
        err = _one_line_error(capsys.readouterr().err)
        assert reason in err and str(d) in err, err
    if reason == "not writable" or os.path.ismount(d):  # the unwritable folder itself, in a writable parent
        assert main(["--model", str(tiny_model_dir), "--output-dir", str(d), *PRUNE]) == 2
        assert f"output folder {d} is not writable" in _one_line_error(capsys.readouterr().err)
    assert list(d.iterdir()) == []


@pytest.mark.parametrize("make, argv, message", [
    (lambda t: (t / "f").write_text("x"), lambda m, t: ["--model", m, "--output-dir", str(t / "f"), *PRUNE],
     "exists and is a file, not a folder"),
    (lambda t: (t / "f").write_text("x"), lambda m, t: ["--model", m, "--output-dir", str(t / "f" / "sub"), *PRUNE],
     "cannot be created: {t}/f is a file"),
    (lambda t: (t / "f").write_text("x"), lambda m, t: ["eval", "--model", m, "--output-dir", str(t / "f"), "-q"],
     "results folder {t}/f exists and is a file"),
    (lambda t: None, lambda m, t: ["eval", "--model", m, "--output-dir", str(t / "results.json"), "-q"],
     "--output-dir is a folder (results.json and results.md are written into it), not a file name"),
    (lambda t: (t / "f").write_text("x"), lambda m, t: ["sweep", "--model", m, "--output-dir", str(t / "f"), "-q"],
     "exists and is a file"),
])
def test_a_file_in_the_way_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys, make, argv,
                                                        message):
    _no_model_load(monkeypatch)
    make(tmp_path)
    assert main(argv(str(tiny_model_dir), tmp_path)) == 2
    assert message.format(t=tmp_path) in _one_line_error(capsys.readouterr().err)
    assert (not (tmp_path / "f").exists()) or (tmp_path / "f").read_text() == "x"


def test_no_room_for_the_model_fails_before_it_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(outputs, "free_bytes", lambda p: 5 * 2**20)
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--output-dir", str(out), *PRUNE]) == 2
    err = _one_line_error(capsys.readouterr().err)
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert checkpoint_params(str(tiny_model_dir)) == params
    need = (tiny_model_dir / "model.safetensors").stat().st_size  # --save-dtype auto: the checkpoint's own files
    assert need >= params * 4  # a float32 checkpoint
    want = int(need * (1 + outputs.SPACE_MARGIN)) + outputs.SPACE_SLACK
    assert f"not enough free space for the pruned model in {out}: it needs about {human_bytes(want)}" in err
    assert f"{human_bytes(need)} plus a margin" in err and "has 5.0 MiB free" in err
    assert not out.exists()


def test_no_room_known_only_after_loading_fails_before_the_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "checkpoint_bytes", lambda spec, dtype: None)  # e.g. a Hub id
    monkeypatch.setattr(outputs, "free_bytes", lambda p: 2**20)

    def no_work(*a, **k):
        raise AssertionError("pruned although the model can't be saved")

    monkeypatch.setattr(pipeline, "prune", no_work)
    assert main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"), *PRUNE]) == 2
    assert "not enough free space for the pruned model" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_gguf_size_is_known_from_its_tensor_metadata(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("a", np.zeros((3, 4), dtype=np.float32))
    w.add_tensor("b", np.zeros((5,), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert checkpoint_params(str(tmp_path / "m.gguf"), gguf_min_bytes=0) == 12 + 5
    assert checkpoint_params(str(tmp_path / "m.gguf")) is None  # small: checked after loading, which is faster
    assert checkpoint_params("some-org/some-model") is None  # a Hub id: known only after loading


def test_model_bytes_counts_tied_weights_once():
    m = tiny_model(tie_word_embeddings=True)
    n = sum(p.numel() for p in {p.data_ptr(): p for p in m.parameters()}.values())
    n += sum(b.numel() for b in m.buffers())
    assert model_bytes(m) == 4 * n and model_bytes(m, __import__("torch").bfloat16) == 2 * n


@pytest.fixture(params=["tiny-tmpfs", "fake-full-disk"])
def full_disk(request, tmp_path, monkeypatch):
    """(folder, patch): a folder where writing a model runs out of space part way."""
    d = tmp_path / "small"
    if request.param == "tiny-tmpfs":
        if not _mount_tmpfs(d, "size=64k"):
            pytest.skip("cannot mount a tmpfs here (the fake full disk covers the path)")
        monkeypatch.setattr(outputs, "free_bytes", lambda p: 2**40)  # the pre-check is fooled: the write finds out
        yield d
        _umount(d)
    else:
        d.mkdir()
        from transformers import PreTrainedModel

        real = PreTrainedModel.save_pretrained

        def half_then_full(self, folder, **kw):
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then_full)
        yield d
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(full_disk):
    out = full_disk / "out"
    with pytest.raises(LLMPruneError) as e:
        _save(out)
    msg = str(e.value)
    assert msg.startswith(f"the disk filled up while writing {out}") and len(msg.splitlines()) == 1
    assert "nothing was saved" in msg
    assert list(full_disk.iterdir()) == []  # no temporary folder, no reserved folder, no lock


def test_disk_full_in_the_cli_is_one_line(tiny_model_dir, full_disk, capsys):
    assert main(["--model", str(tiny_model_dir), "--output-dir", str(full_disk / "out"), *PRUNE]) == 2
    assert "the disk filled up while writing" in _one_line_error(capsys.readouterr().err)
    assert list(full_disk.iterdir()) == []


def test_a_tiny_filesystem_is_refused_before_the_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    d = tmp_path / "tiny"
    if not _mount_tmpfs(d, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (the fake free-space function covers the check)")
    try:
        _no_model_load(monkeypatch)
        assert main(["--model", str(tiny_model_dir), "--output-dir", str(d / "out"), *PRUNE]) == 2
        err = _one_line_error(capsys.readouterr().err)
        free = re.search(r"has ([\d.]+) KiB free", err)  # the tmpfs' 1 MiB, less a block or two (our lock)
        assert "not enough free space" in err and free and 900 < float(free.group(1)) <= 1024, err
        assert list(d.iterdir()) == []
    finally:
        _umount(d)


def test_write_output_dir_refuses_a_reservation_for_another_folder(tmp_path):
    with reserve_output_dir(tmp_path / "a") as r, pytest.raises(ValueError):
        write_output_dir(tmp_path / "b", lambda f: None, reservation=r)


def test_the_output_folder_may_not_be_the_model_folder(tiny_model_dir, capsys):
    """--overwrite would otherwise replace the user's original model with the pruned one."""
    before = sorted((p.name, p.stat().st_size) for p in tiny_model_dir.iterdir())
    for out in (tiny_model_dir, tiny_model_dir.parent):
        assert main(["--model", str(tiny_model_dir), "--method", "magnitude", "--eval-ppl", "none",
                     "--output-dir", str(out), "--overwrite", "--device", "cpu", "-q"]) == 2
        assert "is (or holds) the model being pruned" in _one_line_error(capsys.readouterr().err)
    assert sorted((p.name, p.stat().st_size) for p in tiny_model_dir.iterdir()) == before
