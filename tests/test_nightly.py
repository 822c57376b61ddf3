"""Nightly builds: regressions, failures, idempotency per night, the lock, and one real build.

The regression/idempotency/lock logic runs with an injected build function
(fast); one test runs a real tiny build end to end through likeness.build.runner
(cpu-tiny weights, real face pack, real photos imported in place of
generation) and then re-runs the night to prove nothing is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from likeness.errors import FailedPrecondition, InvalidInput, NotFound
from likeness.nightly import (BuildOutcome, NightlyConfig, compare_scores, nightly_exit_code, nightly_lock,
                             run_nightly)

SPEC_TOML = """
name = "{name}"
token = "{token}"
class_word = "woman"
traits = ["dark hair"]
zooms = ["closeup"]
angles = ["front shot"]
per_cell = 1
profile = "cpu-tiny"
[sampling]
steps = 2
width = 64
height = 64
seed = 42
"""


def _characters(root: Path, names: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, token in names.items():
        (root / f"{name.lower()}.toml").write_text(SPEC_TOML.format(name=name, token=token))
    return root


class FakeBuilds:
    """An injected build function: scores per character, a list of characters that fail, a call log."""

    def __init__(self, scores: dict[str, dict[str, float]], fail: tuple[str, ...] = ()) -> None:
        self.scores, self.fail, self.calls = scores, fail, []

    def __call__(self, spec, spec_file, options, resume_build_id, started) -> BuildOutcome:
        self.calls.append(spec.name)
        self.resumed = getattr(self, "resumed", []) + [resume_build_id]
        if spec.name in self.fail:
            raise RuntimeError(f"GPU fell off the bus while building {spec.name}")
        return BuildOutcome(build_id=f"b-{spec.name}-{len(self.calls)}", state="succeeded", scores=self.scores[spec.name])


GOOD = {"curated_overall": 0.80, "eval_identity_token": 0.60, "eval_clip_t_token": 0.25}


def test_regression_is_named_and_exit_is_non_zero(tmp_path: Path) -> None:
    chars = _characters(tmp_path / "chars", {"Ada": "4d4x", "Bea": "b34x"})
    data = tmp_path / "data"
    night1 = run_nightly(chars, data_dir=data, config=NightlyConfig(night="2026-01-01"),
                         build_fn=FakeBuilds({"Ada": GOOD, "Bea": GOOD}))
    assert nightly_exit_code(night1) == 0 and night1.ok
    assert all(c.previous is None for c in night1.characters)

    # Night 2: Bea's identity drops by 0.2 (> margin 0.05); Ada's CLIP-T drops within the margin.
    worse = dict(GOOD, eval_identity_token=0.40)
    slightly = dict(GOOD, eval_clip_t_token=0.22)
    night2 = run_nightly(chars, data_dir=data, config=NightlyConfig(night="2026-01-02", margin=0.05),
                         build_fn=FakeBuilds({"Ada": slightly, "Bea": worse}))
    assert nightly_exit_code(night2) == 1
    assert night2.regressions == [{"score": "eval_identity_token", "previous": 0.6, "current": 0.4, "drop": 0.2,
                                   "why": "fell by 0.200 (> margin 0.05)", "character": "Bea"}]
    out = night2.to_dict()
    assert out["ok"] is False and out["regressions"][0]["character"] == "Bea"
    summary = json.loads(Path(night2.summary_json).read_text())
    assert summary["regressions"][0]["score"] == "eval_identity_token"
    assert summary["trends"]["Bea"]["nights"] == ["2026-01-01", "2026-01-02"]
    assert summary["trends"]["Bea"]["series"]["eval_identity_token"] == [0.6, 0.4]
    html = Path(night2.summary_html).read_text()
    assert "Regressions" in html and "Bea" in html and html.count('src="data:image/png;base64,') == 2
    # The page is made from summary.json alone (report/nightly_page.py), so it can be re-made from it.
    from likeness.report.nightly_page import nightly_page

    assert nightly_page(summary) == html
    # The history is the store's: the rows are read through likeness.build.store.
    from likeness.build.store import Store

    assert Store(data).nightly_run("2026-01-02", "Bea").scores["eval_identity_token"] == 0.4
    # A wider margin forgives the same drop.
    assert compare_scores(worse, GOOD, margin=0.25) == []
    # A score that vanished is a regression too.
    assert compare_scores({}, {"eval_identity_token": 0.6}, 0.05)[0]["current"] is None


def test_a_failing_character_does_not_stop_the_others(tmp_path: Path) -> None:
    chars = _characters(tmp_path / "chars", {"Ada": "4d4x", "Bea": "b34x", "Cy": "cy0x"})
    (chars / "broken.toml").write_text("name = 'Broken'\ntoken = 'woman is two words'\n")
    builds = FakeBuilds({"Ada": GOOD, "Cy": GOOD}, fail=("Bea",))
    lines: list[str] = []
    res = run_nightly(chars, data_dir=tmp_path / "data", config=NightlyConfig(night="2026-01-01"), build_fn=builds,
                      log=lines.append)
    assert builds.calls == ["Ada", "Bea", "Cy"]
    # A night takes hours: one line as each character starts and one as it ends, with its state.
    assert len(lines) == 8 and lines[0] == "nightly 2026-01-01: [1/4] ada.toml ..."
    assert lines[1].startswith("nightly 2026-01-01: [1/4] Ada: succeeded in ")
    assert "Bea: failed" in lines[3] and "GPU fell off the bus" in lines[3]
    assert nightly_exit_code(res) == 1
    failed = {f["character"]: f["error"] for f in res.failures}
    assert set(failed) == {"Bea", "broken"}
    assert "GPU fell off the bus" in failed["Bea"] and "token" in failed["broken"]
    assert [c.state for c in res.characters if c.character in ("Ada", "Cy")] == ["succeeded", "succeeded"]

    # Re-run the same night: only the failed character is built again; the finished ones are reused.
    builds2 = FakeBuilds({"Bea": GOOD})
    res2 = run_nightly(chars, data_dir=tmp_path / "data", config=NightlyConfig(night="2026-01-01"), build_fn=builds2)
    assert builds2.calls == ["Bea"]
    assert {c.character: c.reused for c in res2.characters if c.state == "succeeded"} == {
        "Ada": True, "Bea": False, "Cy": True}
    assert [f["character"] for f in res2.failures] == ["broken"]


def test_second_run_the_same_night_rebuilds_nothing(tmp_path: Path) -> None:
    chars = _characters(tmp_path / "chars", {"Ada": "4d4x", "Bea": "b34x"})
    first = FakeBuilds({"Ada": GOOD, "Bea": GOOD})
    r1 = run_nightly(chars, data_dir=tmp_path / "data", config=NightlyConfig(night="2026-02-03"), build_fn=first)
    second = FakeBuilds({"Ada": GOOD, "Bea": GOOD})
    r2 = run_nightly(chars, data_dir=tmp_path / "data", config=NightlyConfig(night="2026-02-03"), build_fn=second)
    assert len(first.calls) == 2 and second.calls == []
    assert [c.build_id for c in r2.characters] == [c.build_id for c in r1.characters]
    assert all(c.reused for c in r2.characters) and nightly_exit_code(r2) == 0
    # The next night builds again.
    third = FakeBuilds({"Ada": GOOD, "Bea": GOOD})
    run_nightly(chars, data_dir=tmp_path / "data", config=NightlyConfig(night="2026-02-04"), build_fn=third)
    assert third.calls == ["Ada", "Bea"]


def test_a_run_killed_mid_build_resumes_that_build(tmp_path: Path) -> None:
    """The night's history records the build id as soon as the build exists (not only when it ends),
    so a nightly killed mid-build hands that build to the next run to resume, not a fresh one."""
    chars = _characters(tmp_path / "chars", {"Ada": "4d4x"})
    data = tmp_path / "data"

    class Killed(BaseException):
        pass

    def dies_mid_build(spec, spec_file, options, resume_build_id, started):
        assert resume_build_id == ""
        started("b-ada-1")
        raise Killed()  # what a SIGKILL looks like from here: nothing after this line runs

    with pytest.raises(Killed):
        run_nightly(chars, data_dir=data, config=NightlyConfig(night="2026-05-01"), build_fn=dies_mid_build)
    again = FakeBuilds({"Ada": GOOD})
    res = run_nightly(chars, data_dir=data, config=NightlyConfig(night="2026-05-01"), build_fn=again)
    assert again.resumed == ["b-ada-1"] and res.ok


def test_service_builder_does_not_resume_a_failed_build(monkeypatch) -> None:
    """A build that failed on the server while the nightly was down is rebuilt, not waited on again."""
    from likeness.serve import client as client_mod
    from likeness.nightly import service_builder
    from likeness.serve.pb import likeness_pb2 as pb

    class FakeClient:
        started = []

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def get_build(self, build_id):
            return pb.Build(id=build_id, state=pb.FAILED)

        def start_build(self, spec, options):
            return pb.Build(id="b-new", state=pb.QUEUED)

        def wait_build(self, build_id, timeout=None):
            return pb.Build(id=build_id, state=pb.FAILED, error="boom")

    monkeypatch.setattr(client_mod, "LikenessClient", FakeClient)
    ids = []
    out = service_builder("127.0.0.1:1")(None, Path("x.toml"), {}, "b-old", ids.append)
    assert ids == ["b-new"] and out.build_id == "b-new" and out.state == "failed"


def test_lock_refuses_a_second_run(tmp_path: Path) -> None:
    chars = _characters(tmp_path / "chars", {"Ada": "4d4x"})
    data = tmp_path / "data"
    builds = FakeBuilds({"Ada": GOOD})
    with nightly_lock(data):
        with pytest.raises(FailedPrecondition, match="another nightly run"):
            run_nightly(chars, data_dir=data, config=NightlyConfig(night="2026-01-01"), build_fn=builds)
    assert builds.calls == []
    # Released: the next run goes ahead.
    run_nightly(chars, data_dir=data, config=NightlyConfig(night="2026-01-01"), build_fn=builds)
    assert builds.calls == ["Ada"]


def test_lock_across_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from likeness.nightly import nightly_lock\n"
         f"with nightly_lock(Path({str(data)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FailedPrecondition, match=f"pid {holder.pid}"):
            with nightly_lock(data):
                pass
    finally:
        holder.kill()
        holder.wait()
    with nightly_lock(data):  # a killed holder leaves no stale lock
        pass


def test_inputs(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no character specs"):
        run_nightly(tmp_path, data_dir=tmp_path / "d", build_fn=FakeBuilds({}))
    chars = _characters(tmp_path / "chars", {"Ada": "4d4x"})
    with pytest.raises(InvalidInput, match="YYYY-MM-DD"):
        run_nightly(chars, data_dir=tmp_path / "d", config=NightlyConfig(night="yesterday"), build_fn=FakeBuilds({}))


# ------------------------------------------------------------------ one real build

@pytest.mark.slow
def test_real_tiny_build_end_to_end_and_rerun(tmp_path: Path, tiny_models, face_pack, realdata, capsys,
                                               monkeypatch) -> None:
    from PIL import Image

    from likeness.cli.main import main

    photos = tmp_path / "photos"
    photos.mkdir()
    faces = realdata / "faces"
    for p in sorted((faces / "Angelina_Jolie").glob("*.jpg"))[:6] + [faces / "Barack_Obama" / "fr_obama1.jpg"]:
        with Image.open(p) as img:
            img = img.convert("RGB")
            img.thumbnail((256, 256))
            img.save(photos / f"{p.parent.name}_{p.stem}.jpg", quality=92)
    chars = _characters(tmp_path / "chars", {"Jolie": "j0l1e"})
    data = tmp_path / "data"
    config = NightlyConfig(night="2026-03-01", k=4, training_steps=2, options={
        "import_gallery": str(photos), "checkpoint_every": 1, "train_resolution": 64,
        "eval_scenes": ["cooking in a kitchen"], "eval_steps": 2})
    res = run_nightly(chars, data_dir=data, config=config)
    assert res.failures == [] and nightly_exit_code(res) == 0, res.failures
    (c,) = res.characters
    assert c.state == "succeeded" and c.build_id
    report = json.loads((data / "builds" / c.build_id / "report" / "report.json").read_text())
    assert all(s["ran"] for s in report["stages"])
    assert c.scores == report["summary"]["scores"] and "curated_overall" in c.scores
    # An imported gallery has no zoom/angle: the contact sheet still shows every image, marked.
    html = (data / "builds" / c.build_id / "report" / "report.html").read_text()
    n_kept = sum(1 for i in report["gallery"]["images"] if i["kept"])
    assert n_kept and html.count('class="th kept"') == n_kept
    assert html.count('class="th rej"') == report["gallery"]["n_images"] - n_kept
    assert report["curation"]["heatmap"]["unplaced"] == report["gallery"]["n_images"]

    # The same night again, through the CLI: nothing is rebuilt, exit status 0, JSON on stdout.
    capsys.readouterr()
    assert main(["nightly", str(chars), "--data", str(data), "--night", "2026-03-01"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["characters"][0]["reused"] and out["characters"][0]["build_id"] == c.build_id
    from likeness.build.store import Store

    store = Store(data)
    try:
        assert [b.id for b in store.list_builds(character="Jolie")] == [c.build_id]
        # It ran as a claimed build (never left queued for a server on the same data dir to take).
        assert store.get_build(c.build_id).started_at > 0 and store.get_build(c.build_id).device
    finally:
        store.close()


def test_scheduler_files_call_a_valid_command() -> None:
    """The cron line and the systemd unit run `likeness nightly` with flags the CLI accepts."""
    import shlex

    from likeness.cli.main import build_parser

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    service = (scripts / "likeness-nightly.service").read_text()
    timer = (scripts / "likeness-nightly.timer").read_text()
    cron = (scripts / "likeness-nightly.cron").read_text()
    assert "OnCalendar=" in timer and "Persistent=true" in timer and "Type=oneshot" in service
    exec_start = next(line.split("=", 1)[1] for line in service.splitlines() if line.startswith("ExecStart="))
    cron_line = next(line for line in cron.splitlines() if line and not line.startswith("#") and "nightly" in line)
    cron_cmd = cron_line.split(".venv/bin/", 1)[1].split(" >>", 1)[0]
    for command in (exec_start, cron_cmd):
        argv = shlex.split(command)
        assert Path(argv[0]).name == "likeness"
        args = build_parser().parse_args(argv[1:])
        assert args.command == "nightly" and args.margin == 0.05
    # five time fields, a user, then the command
    assert len(cron_line.split()[:6]) == 6 and cron_line.split()[5] == "likeness"


def test_nightly_through_a_running_service(tmp_path: Path, capsys, stand_in_stages) -> None:
    """`likeness nightly --server`: builds go through gRPC (StartBuild, WatchBuild, GetReport).

    The server's stages are stand-ins (plumbing only, as in tests/test_server.py) except the
    report stage, which writes the real report of what is in the build folder.
    """
    from likeness.serve.auth import AuthConfig
    from likeness.cli.main import main
    from likeness.report.document import write_report
    from likeness.serve.runtime import Runtime
    from likeness.serve.servicer import create_server

    def real_report(name, ctx, round_):
        if name == "report":
            return {"files": {k: str(p.relative_to(ctx.root)) for k, p in write_report(ctx.root).items()}}
        return None

    stages = stand_in_stages(real_report)
    rt = Runtime(tmp_path / "server-data", devices=["cpu"], default_profile="cpu-tiny", stages=stages)
    server, port, _health = create_server("127.0.0.1:0", rt, auth=AuthConfig(token="t0ken-for-tests"))
    server.start()
    rt.start(load_models=False)
    try:
        chars = _characters(tmp_path / "chars", {"Ada": "4d4x", "Bea": "b34x"})
        argv = ["nightly", str(chars), "--data", str(tmp_path / "nightly-data"), "--server", f"127.0.0.1:{port}",
                "--token", "t0ken-for-tests", "--night", "2026-04-01"]
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert [c["state"] for c in out["characters"]] == ["succeeded", "succeeded"]
        ids = [c["build_id"] for c in out["characters"]]
        assert sorted(b.id for b in rt.list_builds()) == sorted(ids)
        assert main(argv) == 0  # same night: nothing new on the server
        assert len(rt.list_builds()) == 2
    finally:
        server.stop(0)
        rt.stop()
