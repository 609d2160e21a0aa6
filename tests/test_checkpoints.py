"""Checkpoints never lose a run: a rank killed at any point of a save leaves the last complete
checkpoint usable; resume verifies every file (manifest: list, sizes, sha256), refuses files the
trainer did not write and ``latest`` pointing anywhere else, unpickles with weights_only, and
refuses a different setup unless --allow-config-change.

Fast tests drive ntl_deepspeed.train.checkpoint with a stand-in engine that writes and reads its
files through the real SafeCheckpointEngine; the launch tests run the real trainer on 2 ranks."""
import datetime
import json
import math
import multiprocessing
import os
import shutil
import signal

import pytest
import torch
import torch.distributed as dist

from dist_utils import free_port
from launch_utils import launch, losses_by_step, metrics
from ntl_deepspeed.train import checkpoint
from ntl_deepspeed.train.checkpoint import CheckpointError

CONFIG = {"ntl": {"weight": 0.3}, "seq_len": 32}


class StandInEngine:
    """What checkpoint.save/resume use of a DeepSpeed engine: two 'ranks' x two files per save
    (like ZeRO-3's model and optimizer states), written through the safe checkpoint engine."""

    def __init__(self, ranks=(0, 1)):
        self.checkpoint_engine = checkpoint.make_safe_engine(None)
        self.ranks = ranks  # whose files this process writes

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        for rank in self.ranks:
            for kind in ("model_states", "optim_states"):
                state = {"w": torch.full((256,), float(client_state["step"])), "rank": rank,
                         **client_state}
                self.checkpoint_engine.save(
                    state, os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_{kind}.pt"))
        with open(os.path.join(save_dir, "zero_to_fp32.py"), "w") as f:
            f.write("# recovery script\n")

    def load_checkpoint(self, ckpt_dir, tag):
        folder = os.path.join(ckpt_dir, tag)
        states = [self.checkpoint_engine.load(os.path.join(folder, name))
                  for name in sorted(os.listdir(folder)) if name.endswith(".pt")]
        assert len(states) == 4
        steps = {int(s["step"]) for s in states}
        assert len(steps) == 1 and all(torch.equal(s["w"], torch.full((256,), float(s["step"])))
                                       for s in states)
        return folder, {"step": states[0]["step"]}


def save_steps(ckpt, steps, keep=2, config=CONFIG, ranks=(0, 1)):
    engine = StandInEngine(ranks)
    for step in steps:
        checkpoint.save(engine, str(ckpt), step, {"step": step}, config, keep=keep,
                        log=lambda m: None)
    return engine


def resume(ckpt, config=CONFIG, **kw):
    messages = []
    folder, state = checkpoint.resume(StandInEngine(), str(ckpt), config, log=messages.append,
                                      **kw)
    return int(state["step"]), " ".join(messages)


# ---------------------------------------------------------------------- crashes during a save
POINTS = [f"file{n}{s}" for n in range(1, 5) for s in ("", ".mid", ".done")] + [
    "saved", "manifest", "renamed", "latest"]


def _saves_until_killed(ckpt, fault):
    os.environ[checkpoint.FAULT_ENV] = fault
    torch.set_num_threads(1)
    save_steps(ckpt, (2, 4, 6))
    os._exit(0)


def expected_resume(save_no, point):
    """Killed at ``point`` of save ``save_no`` (steps 2, 4, 6): the checkpoint to resume from."""
    if point == "latest" or (point == "renamed" and save_no == 1):  # renamed: complete
        return 2 * save_no
    return 2 * (save_no - 1) or None


def test_killed_at_every_point_of_a_save_resumes_from_a_complete_checkpoint(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for save_no in (1, 2, 3):
        for point in POINTS:
            ckpt = tmp_path / f"s{save_no}_{point}"
            child = ctx.Process(target=_saves_until_killed, args=(str(ckpt), f"0:{save_no}:{point}"))
            child.start()
            child.join(60)
            assert child.exitcode == -signal.SIGKILL, (save_no, point, child.exitcode)
            want = expected_resume(save_no, point)
            if want is None:
                with pytest.raises(CheckpointError, match="no complete checkpoint"):
                    resume(ckpt)
                continue
            step, said = resume(ckpt)  # the stand-in's load checks every tensor
            assert step == want, (save_no, point, said)
            # the next save cleans up what the crash left behind
            save_steps(ckpt, (want + 1,))
            assert sorted(n for n in os.listdir(ckpt) if n.startswith(".")) == []
            assert (ckpt / "latest").read_text() == f"step{want + 1}"


def _rank_saves_until_killed(rank, port, ckpt, fault):
    try:
        os.environ[checkpoint.FAULT_ENV] = fault
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=20))
        save_steps(ckpt, (2, 4, 6), ranks=(rank,))  # each rank writes its own two files
        dist.barrier()
    except BaseException:  # noqa: BLE001 - the survivor of a killed peer lands here
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("rank,points", [
    (1, ["file1", "file1.mid", "file2.mid", "file2.done", "saved"]),
    (0, ["file2.mid", "saved", "manifest", "renamed", "latest"]),
])
def test_either_of_two_ranks_killed_during_a_save(tmp_path, rank, points):
    """Two real processes (gloo), each writing its own files: whichever dies, wherever, the
    survivor fails (no commit without every rank's files) and resume finds a complete one."""
    ctx = multiprocessing.get_context("fork")
    for point in points:
        ckpt = str(tmp_path / point)
        port = free_port()
        procs = [ctx.Process(target=_rank_saves_until_killed,
                             args=(r, port, ckpt, f"{rank}:2:{point}")) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert procs[rank].exitcode == -signal.SIGKILL, (point, procs[rank].exitcode)
        assert procs[1 - rank].exitcode == 1, (point, procs[1 - rank].exitcode)
        want = expected_resume(2, point) if rank == 0 else 2
        assert resume(ckpt)[0] == want, point


def test_keep_checkpoints_deletes_older_complete_ones(tmp_path):
    save_steps(tmp_path, (1, 2, 3, 4, 5), keep=3)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step")) == [
        "step3", "step4", "step5"]
    save_steps(tmp_path / "all", (1, 2, 3), keep=0)
    assert len([n for n in os.listdir(tmp_path / "all") if n.startswith("step")]) == 3


# ---------------------------------------------------------------------- untrusted files
class Evil:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_evil(path, marker):
    torch.save({"module": Evil(marker)}, path)


def relist(folder, name):
    """Update the manifest entry of ``name`` to the file as it is now (a tamperer who also
    rewrote the manifest)."""
    manifest_path = os.path.join(folder, checkpoint.MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    size, sha = checkpoint.file_digest(os.path.join(folder, name))
    manifest["files"][name] = {"size": size, "sha256": sha}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def test_corrupted_file_is_detected_and_resume_falls_back(tmp_path):
    save_steps(tmp_path, (2, 4))
    victim = tmp_path / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)  # same size, different bytes
    victim.write_bytes(bytes(data))
    step, said = resume(tmp_path)
    assert step == 2
    assert "sha256 mismatch" in said and "resuming from step2" in said
    # nothing complete left: a clear error naming every problem
    victim2 = tmp_path / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    victim2.write_bytes(victim2.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*step2: zero_pp_rank_0"):
        resume(tmp_path)


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    save_steps(tmp_path / "c", (2, 4))
    ckpt = tmp_path / "c"
    # 1) an extra file the manifest does not list: the checkpoint is refused, we fall back
    plant_evil(ckpt / "step4" / "extra_states.pt", marker)
    step, said = resume(ckpt)
    assert step == 2 and "extra_states.pt is not in the manifest" in said
    # 2) a listed file replaced, manifest rewritten to match: weights_only refuses to unpickle
    os.remove(ckpt / "step4" / "extra_states.pt")
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    plant_evil(ckpt / "step4" / name, marker)
    relist(str(ckpt / "step4"), name)
    with pytest.raises(CheckpointError, match=r"refused to load: .*unsupported GLOBAL "
                                              r"(posix|os)\.system"):
        resume(ckpt)
    # 3) a file loaded directly that no manifest lists
    loose = tmp_path / "loose.pt"
    plant_evil(loose, marker)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        StandInEngine().checkpoint_engine.load(str(loose))
    assert not marker.exists()


@pytest.mark.parametrize("latest,problem", [
    ("../../elsewhere/step4", "not a checkpoint folder inside"),
    ("/tmp/step4", "not a checkpoint folder inside"),
    ("step9", "leads outside"),  # a symlink to a complete checkpoint elsewhere
    (".tmp-step6", "not a checkpoint folder inside"),
])
def test_latest_must_name_a_folder_inside_the_checkpoint_directory(tmp_path, latest, problem):
    save_steps(tmp_path / "elsewhere", (4,))
    ckpt = tmp_path / "run" / "checkpoints"
    save_steps(ckpt, (2,))
    os.symlink(tmp_path / "elsewhere" / "step4", ckpt / "step9")
    (ckpt / "latest").write_text(latest)
    step, said = resume(ckpt)
    assert step == 2 and problem in said, said


def test_symlinks_and_unsafe_manifest_paths_are_refused(tmp_path):
    save_steps(tmp_path, (2, 4))
    os.symlink("/etc/hostname", tmp_path / "step4" / "zero_extra.pt")
    step, said = resume(tmp_path)
    assert step == 2 and "zero_extra.pt is a symlink" in said
    os.remove(tmp_path / "step4" / "zero_extra.pt")
    with open(tmp_path / "step4" / "manifest.json") as f:
        manifest = json.load(f)
    manifest["files"]["../step2/manifest.json"] = {"size": 1, "sha256": "0"}
    (tmp_path / "step4" / "manifest.json").write_text(json.dumps(manifest))
    step, said = resume(tmp_path)
    assert step == 2 and "unsafe path" in said


# ---------------------------------------------------------------------- setup changes
def test_resume_with_a_different_setup_is_refused_unless_allowed(tmp_path):
    save_steps(tmp_path, (2,))
    changed = {"ntl": {"weight": 0.5}, "seq_len": 64}
    with pytest.raises(CheckpointError, match=r"different setup: ntl\.weight: 0\.3 -> 0\.5; "
                                              r"seq_len: 32 -> 64\. .*--allow-config-change"):
        resume(tmp_path, changed)
    step, said = resume(tmp_path, changed, allow_change=True)
    assert step == 2 and "changed setup: ntl.weight: 0.3 -> 0.5; seq_len: 32 -> 64" in said


# ---------------------------------------------------------------------- real launches
STEPS = ("--steps", "6", "--save-every", "2", "--keep-checkpoints", "2")


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """6 steps with checkpoints every 2; rank 1 is SIGKILLed half-way through its second file
    of the step-4 save; then the same command with --resume. Returns (folder, rows logged
    before the crash, what the crash left, the resumed launch)."""
    out = tmp_path_factory.mktemp("crashed")
    proc = launch(out, *STEPS, check=False, extra_env={checkpoint.FAULT_ENV: "1:2:file2.mid"})
    assert proc.returncode != 0 and "rank 1 killed at file2.mid of save 2" in proc.output
    ckpt = out / "checkpoints"
    left = {"latest": (ckpt / "latest").read_text(), "entries": sorted(os.listdir(ckpt))}
    before = metrics(out)
    resumed = launch(out, *STEPS, "--resume")
    return out, before, left, resumed


def test_rank_killed_mid_file_during_a_save_resumes_exactly(crashed_run):
    out, before, left, resumed = crashed_run
    ckpt = out / "checkpoints"
    # the crash left step2 complete and named by latest, step4 only as a staging folder
    assert left == {"latest": "step2", "entries": [".tmp-step4", "latest", "step2",
                                                   "zero_to_fp32.py", "zero_to_torch.py"]}
    assert [r["step"] for r in before] == [0, 1, 2, 3]
    assert f"--resume: continuing from {ckpt / 'step2'}" in resumed.output
    # steps 2 and 3, trained again from the checkpoint, equal the uninterrupted run's
    after = metrics(out)[len(before):]
    assert [r["step"] for r in after] == [2, 3, 4, 5]
    assert [r["loss"] for r in after[:2]] == pytest.approx([r["loss"] for r in before[2:]],
                                                           rel=1e-6)
    assert losses_by_step(out)[5] < before[0]["loss"]
    assert sorted(os.listdir(ckpt)) == ["latest", "step4", "step6", "zero_to_fp32.py",
                                        "zero_to_torch.py"]  # crash leftovers gone, keep 2


def test_corrupted_and_hostile_files_in_a_real_checkpoint(crashed_run, tmp_path):
    shutil.copytree(crashed_run[0] / "checkpoints", tmp_path / "checkpoints")
    ckpt = tmp_path / "checkpoints"
    # step6 (latest): one optimizer shard overwritten in place, same size
    victim = ckpt / "step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[-5000:-4000] = os.urandom(1000)
    victim.write_bytes(bytes(data))
    # step4: rank 0's model states replaced by a pickle that runs a command, manifest updated
    marker = tmp_path / "pwned"
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    plant_evil(ckpt / "step4" / name, marker)
    relist(str(ckpt / "step4"), name)
    proc = launch(tmp_path, *STEPS, "--resume", check=False)
    assert proc.returncode != 0
    assert ("--resume: 'latest' names step6, but zero_pp_rank_1_mp_rank_00_optim_states.pt: "
            "sha256 mismatch (corrupted or modified); resuming from step4") in proc.output
    assert (f"error: {ckpt / 'step4' / name}: refused to load: unsupported GLOBAL "
            "posix.system") in proc.output
    assert not marker.exists()


def test_setup_change_allowed_and_logged_then_divergence_stops_loudly(crashed_run, tmp_path):
    shutil.copytree(crashed_run[0] / "checkpoints", tmp_path / "checkpoints")
    # (the refusal without --allow-config-change: test_resume_with_a_different_setup_...)
    # from step 9 on the loss is NaN: 3 non-finite steps, then a loud stop
    proc = launch(tmp_path, "--steps", "20", "--save-every", "2", "--resume", "--ntl-weight",
                  "0.5", "--allow-config-change", check=False,
                  extra_env={"NTL_DEBUG_NAN_FROM": "8"})
    assert proc.returncode != 0
    assert "--allow-config-change: resuming" in proc.output
    assert "with a changed setup: ntl.weight: 0.3 -> 0.5" in proc.output
    good = tmp_path / "checkpoints" / "step8"
    assert (f"error: training diverged: the loss was non-finite (nan) for 3 consecutive "
            f"optimizer steps (9..11); the last good checkpoint is {good}") in proc.output
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert [math.isfinite(r["loss"]) for r in rows] == [True, True, False, False, False]
    steps = sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("step"))
    assert steps == ["step4", "step6", "step8"]  # none of a NaN step (step10)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step8"
