"""`dinotrain submit` without a cluster: profiles, flags over profiles, the sbatch script, bad input, and the
pieces of the in-job requeue logic that need no SLURM."""

from __future__ import annotations

import pytest

from dinotrain.cli import main
from dinotrain.config import ConfigError
from dinotrain.launch.job import RequeueLimitReached, SlurmRun, parse_slurm_duration
from dinotrain.launch.profiles import available_profiles, load_profile
from dinotrain.launch.slurm import build_request, parse_slurm_extra
from dinotrain.launch.watch import JobState, parse_scontrol


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    d.mkdir()
    monkeypatch.setenv("DINOTRAIN_SLURM_PROFILES", str(d))
    (d / "mycluster.yaml").write_text(
        "partition: gpu\naccount: proj\nqos: high\nconstraint: h100\ngpus_per_node: 8\ncpus_per_gpu: 12\n"
        "mem_gb: 512\ntime: 1440\nsignal_delay_s: 300\nsetup: [module load cuda/12.4]\nslurm_extra: {exclusive: true}\n")
    return d


def test_shipped_profiles_are_valid():
    assert {"local", "example"} <= set(available_profiles())
    assert load_profile("local")["partition"] == "debug"
    assert load_profile("example")["gpus_per_node"] == 8


def test_profile_values_and_flag_overrides(profiles):
    req = build_request("mycluster", {"nodes": 2, "time": 60, "partition": None, "slurm_extra": {"reservation": "r1"}})
    assert (req.partition, req.account, req.qos, req.constraint) == ("gpu", "proj", "high", "h100")
    assert (req.nodes, req.gpus_per_node, req.tasks_per_node, req.cpus_per_task) == (2, 8, 8, 12)
    assert (req.time, req.signal_delay_s, req.mem_gb) == (60, 300, 512)  # --time wins over the profile
    assert req.num_tasks == 16
    params = req.sbatch_parameters("dinotrain-train-x")
    assert params["additional_parameters"] == {"exclusive": True, "reservation": "r1"}
    assert params["setup"] == ["module load cuda/12.4"] and params["mem"] == "512GB"
    assert "--kill-on-bad-exit=1" in params["srun_args"]


def test_cpu_processes_without_gpus():
    req = build_request(None, {"gpus_per_node": 0, "tasks_per_node": 3})
    assert (req.tasks_per_node, req.gpus_per_node) == (3, 0)
    assert "gpus_per_node" not in req.sbatch_parameters("x")
    assert build_request(None, {}).tasks_per_node == 1


@pytest.mark.parametrize("flags, message", [
    ({"nodes": 0}, "--nodes 0: a job needs at least 1 node"),
    ({"gpus_per_node": -1}, "--gpus-per-node -1"),
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "one process per GPU"),
    ({"tasks_per_node": 0}, "--tasks-per-node 0"),
    ({"time": 0}, "--time 0"),
    ({"time": 1, "signal_delay_s": 90}, "signal_delay_s 90"),
    ({"mem_gb": -4}, "--mem-gb -4"),
])
def test_bad_request_is_a_clear_error(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_request(None, flags)


def test_unknown_profile_and_bad_profile_keys(profiles):
    with pytest.raises(ConfigError, match="unknown cluster profile 'mycluste'.*did you mean 'mycluster'"):
        load_profile("mycluste")
    (profiles / "typo.yaml").write_text("partiton: gpu\n")
    with pytest.raises(ConfigError, match="unknown key 'partiton'.*did you mean 'partition'"):
        load_profile("typo")
    (profiles / "types.yaml").write_text("gpus_per_node: eight\n")
    with pytest.raises(ConfigError, match="'gpus_per_node' must be int"):
        load_profile("types")
    (profiles / "list.yaml").write_text("- partition\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_profile("list")
    with pytest.raises(ConfigError, match="profile file not found"):
        load_profile(str(profiles / "missing.yaml"))


def test_slurm_extra_parsing():
    assert parse_slurm_extra(["reservation=abc", "exclusive", "--mail-type=END"]) == {
        "reservation": "abc", "exclusive": True, "mail_type": "END"}
    with pytest.raises(ConfigError):
        parse_slurm_extra(["=x"])


def test_dry_run_prints_the_sbatch_script(profiles, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["submit", "train", "--cluster", "mycluster", "--nodes", "2", "--qos", "low", "--config", "smoke/cpu_tiny",
                 "--output-dir", str(run), "--slurm-extra", "reservation=r1", "--dry-run", "optim.epochs=1"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=low", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=12",
                 "#SBATCH --constraint=h100", "#SBATCH --mem=512GB", "#SBATCH --time=1440", "#SBATCH --signal=USR2@300",
                 "#SBATCH --exclusive", "#SBATCH --reservation=r1", "module load cuda/12.4", "--kill-on-bad-exit=1",
                 f"#SBATCH --output={run}/slurm/%j_0_log.out"):
        assert line in script, line
    assert not run.exists(), "a dry run writes nothing"


@pytest.mark.parametrize("argv, message", [
    (["--cluster", "nosuch"], "unknown cluster profile 'nosuch'"),
    (["--nodes", "0"], "--nodes 0"),
    (["train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
])
def test_submit_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert main(["submit", "train", "--config", "smoke/cpu_tiny", "--output-dir", str(tmp_path / "r"), "--dry-run",
                 *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_submit_without_slurm_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    assert main(["submit", "train", "--config", "smoke/cpu_tiny", "--output-dir", str(tmp_path / "r")]) == 2
    assert "SLURM is not available here" in capsys.readouterr().err


def test_scontrol_parsing():
    line = ("JobId=7 JobName=dinotrain-train-run UserId=root(0) JobState=PENDING Reason=BeginTime Dependency=(null) "
            "Requeue=1 Restarts=2 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:01:00")
    f = parse_scontrol(line)
    assert (f["JobState"], f["Reason"], f["Restarts"], f["ExitCode"]) == ("PENDING", "BeginTime", "2", "0:0")
    assert not JobState("PENDING").done and not JobState("REQUEUED").done and JobState("CANCELLED").done


@pytest.mark.parametrize("text, seconds", [("1:02", 62), ("1:00:00", 3600), ("2-03:04:05", 2 * 86400 + 11045),
                                           ("UNLIMITED", None), ("", None), ("INVALID", None)])
def test_squeue_time_left_parsing(text, seconds):
    assert parse_slurm_duration(text) == seconds


def test_requeues_are_bounded(monkeypatch):
    job = SlurmRun("train", {"launch": {"max_requeues": 2}}, "/runs/x", 120)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job.checkpoint()
    assert again.function.run_dir == "/runs/x" and again.function.command == "train"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(RequeueLimitReached, match="launch.max_requeues=2"):
        job.checkpoint()


@pytest.mark.parametrize("students, crops, message", [
    ("{vit: {student: {arch: vit_tiny}}, cnn: {student: {arch: timm/resnet18}}}", 16,
     "student 'cnn': config key 'student.arch' = timm/resnet18 cannot take crops.local_crops_size = 16 px crops: "
     "smaller than its total stride 32"),
    ("{cnn: {student: {arch: timm/resnet1}}}", 32, "timm has no model of that name; did you mean timm/resnet18"),
])
def test_submit_refuses_a_cnn_student_the_job_would_refuse(students, crops, message, tmp_path, capsys):
    """A timm student's crop sizes and name are checked before submitting (`--dry-run` included), not in the job."""
    pytest.importorskip("timm")
    assert main(["submit", "distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(tmp_path / "r"),
                 "--dry-run", f"distillation.students={students}", "crops.global_crops_size=32",
                 f"crops.local_crops_size={crops}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["submit", "distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(tmp_path / "r"),
                 "--dry-run", "distillation.students={cnn: {student: {arch: timm/resnet18}}}",
                 "crops.global_crops_size=32", "crops.local_crops_size=32"]) == 0  # what it can take: the script
    assert "#SBATCH" in capsys.readouterr().out
