"""Nightly builds: every character spec of a folder, compared with its last good build.

``run_nightly(characters_dir, data_dir=...)``:

- takes ``<data_dir>/nightly.lock`` (``filelock``, non-blocking): a second
  run at the same time fails at once instead of building everything twice;
- keys the run by night (``YYYY-MM-DD``, local time, or ``config.night``): a
  character whose build for this night already succeeded is not rebuilt, so
  re-running after a crash or a fix only builds what is missing or failed;
- builds each character (embedded through likeness.build.runner, or through a running
  service with ``service_builder``); one failing character is recorded and the
  others still build;
- compares every headline score (``report.json``'s ``summary.scores``, all
  higher-is-better) with the character's previous successful nightly build: a
  drop of more than ``margin`` is a regression;
- writes ``<data_dir>/nightly/<night>/summary.json`` and ``summary.html``
  (trend plot per character) and returns a result whose exit code is non-zero
  when any build failed or any score regressed.

History lives in the service's store (``<data_dir>/likeness.db``, table
``nightly_runs``, :meth:`likeness.build.store.Store.nightly_run` and friends): the
store is the one owner of that file. The summary page is made by
:mod:`likeness.report.nightly_page`, beside the build report page.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from likeness import layout
from likeness.build.options import BuildOptions
from likeness.build.store import Store
from likeness.config import same_as
from likeness.errors import FailedPrecondition, InvalidInput, NotFound
from likeness.files import atomic_write_json, atomic_write_text, check_name
from likeness.progress import ProgressFn

LOCK_NAME = "nightly.lock"
# Scores drawn in the trend plot (all of report summary.scores are compared).
TREND_SCORES = ("curated_overall", "curated_identity_consistency", "train_best_score",
                "eval_identity_token", "eval_clip_t_token", "eval_identity_gain_vs_baseline")

@dataclass(frozen=True)
class NightlyConfig:
    # A score falling by more than this (absolute, scores are 0-1 or cosines) is a regression.
    margin: float = 0.05
    # Night key YYYY-MM-DD; "" = today in local time (what a cron job at 02:00 means).
    night: str = ""
    # Build options passed to every build (0/"" = the build's defaults); k's default and bound are the build's.
    k: int = same_as(BuildOptions, "k")
    images_per_cell: int = 0
    training_steps: int = 0
    profile: str = ""
    # Extra build options (likeness.build.options.BuildOptions fields), e.g. {"eval_steps": 2} in tests.
    options: dict[str, Any] = field(default_factory=dict)

    def build_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"k": self.k}
        if self.images_per_cell:
            opts["images_per_cell"] = self.images_per_cell
        if self.training_steps:
            opts["training_steps"] = self.training_steps
        if self.profile:
            opts["profile"] = self.profile
        opts.update(self.options)
        return opts


@dataclass(frozen=True)
class BuildOutcome:
    """What a build function reports back for one character."""

    build_id: str
    # "succeeded", "failed" or "cancelled" (the store's final states).
    state: str
    # report.json summary.scores (higher is better); empty when the build failed.
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str = ""


# build_fn(spec, spec_file, options, resume_build_id, started) -> BuildOutcome. ``started(build_id)``
# must be called as soon as the build exists: the night's history records the id, so a run killed
# mid-build resumes that build the next time instead of starting over.
BuildFn = Callable[[Any, Path, dict[str, Any], str, Callable[[str], None]], BuildOutcome]


@dataclass
class CharacterNight:
    character: str
    spec_file: str
    state: str
    build_id: str = ""
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str = ""
    # True when this night's successful build was found and not rebuilt.
    reused: bool = False
    previous: dict[str, Any] | None = None
    regressions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class NightlyResult:
    night: str
    margin: float
    characters: list[CharacterNight]
    summary_json: str = ""
    summary_html: str = ""

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [dict(r, character=c.character) for c in self.characters for r in c.regressions]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [{"character": c.character, "spec_file": c.spec_file, "build_id": c.build_id, "error": c.error}
                for c in self.characters if c.state != "succeeded"]

    @property
    def ok(self) -> bool:
        return not self.regressions and not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"night": self.night, "ok": self.ok, "margin": self.margin, "regressions": self.regressions,
                "failures": self.failures, "characters": [asdict(c) for c in self.characters],
                "summary_json": self.summary_json, "summary_html": self.summary_html}


def nightly_exit_code(result: NightlyResult) -> int:
    """0 when every build succeeded and nothing regressed beyond the margin; 1 otherwise."""
    return 0 if result.ok else 1


# ------------------------------------------------------------------ lock

@contextmanager
def nightly_lock(data_dir: Path) -> Iterator[Path]:
    """Hold ``<data_dir>/nightly.lock`` for the run; FailedPrecondition if another run holds it.

    The lock is the operating system's (``filelock``: flock on Linux and macOS, msvcrt on
    native Windows), released by the kernel when the process dies, so a killed run never
    leaves a stale lock behind. The holder's pid sits beside it in ``nightly.pid`` for the
    message (a locked file cannot be read on Windows).
    """
    import filelock

    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    pid_file = data_dir / "nightly.pid"
    lock = filelock.FileLock(path, timeout=0, fallback_to_soft=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            holder = pid_file.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise FailedPrecondition(f"another nightly run holds {path} (pid {holder}); wait for it to finish") from None
    try:
        pid_file.write_text(str(os.getpid()), encoding="utf-8")
        yield path
    finally:
        lock.release()


# ------------------------------------------------------------------ comparing

def compare_scores(current: dict[str, Any], previous: dict[str, Any], margin: float) -> list[dict[str, Any]]:
    """Scores that fell by more than ``margin`` (or vanished) since ``previous``; all are higher-is-better."""
    out = []
    for name in sorted(previous):
        before = previous[name]
        if not isinstance(before, (int, float)):
            continue
        now = current.get(name)
        if not isinstance(now, (int, float)):
            out.append({"score": name, "previous": before, "current": None, "drop": None,
                        "why": "the score was measured last time and is missing now"})
        elif before - now > margin:
            out.append({"score": name, "previous": before, "current": now, "drop": round(before - now, 4),
                        "why": f"fell by {before - now:.3f} (> margin {margin})"})
    return out


def character_name(spec: Any) -> str:
    """The spec's name as a store character name ("Emily Rose" -> "Emily_Rose")."""
    return check_name(spec.name.strip().replace(" ", "_"), "character name")


def _night(config: NightlyConfig) -> str:
    night = config.night or _dt.date.today().isoformat()
    try:
        _dt.date.fromisoformat(night)
    except ValueError:
        raise InvalidInput(f"night {night!r} is not a date; use YYYY-MM-DD") from None
    return night


# ------------------------------------------------------------------ the run

def run_nightly(characters_dir: str | Path, *, data_dir: str | Path, config: NightlyConfig | None = None,
                build_fn: BuildFn | None = None, log: Callable[[str], None] | None = None,
                progress: ProgressFn | None = None) -> NightlyResult:
    """Build every ``*.toml`` spec in ``characters_dir`` once per night; see the module docstring.

    ``build_fn`` defaults to an embedded build over ``data_dir``'s store
    (:func:`embedded_builder`, which reports its stages to ``progress``); pass
    :func:`service_builder` for ``--server``. ``log`` gets one line per character as
    it starts and ends (the CLI prints them on stderr: a night takes minutes to hours).
    """
    from likeness.spec import load_spec

    config = config or NightlyConfig()
    if not 0.0 <= config.margin <= 1.0:
        raise InvalidInput(f"margin {config.margin} must be between 0 and 1 (e.g. 0.05)")
    night = _night(config)
    root = Path(characters_dir)
    specs = sorted(root.glob("*.toml")) if root.is_dir() else []
    if not specs:
        raise NotFound(f"no character specs (*.toml) in {root}; put one spec file per character there")
    data = Path(data_dir)
    with nightly_lock(data):
        store = Store(data)
        build = build_fn or embedded_builder(data, progress=progress)
        results = []
        say = log or (lambda _msg: None)
        try:
            for n, spec_file in enumerate(specs, start=1):
                say(f"nightly {night}: [{n}/{len(specs)}] {spec_file.name} ...")
                t0 = time.monotonic()
                cn = _one(store, build, spec_file, night, config, load_spec)
                results.append(cn)
                say(f"nightly {night}: [{n}/{len(specs)}] {cn.character}: {cn.state}"
                    + (" (already built tonight)" if cn.reused else f" in {time.monotonic() - t0:.0f} s")
                    + (f", {len(cn.regressions)} regression(s)" if cn.regressions else "")
                    + (f": {cn.error}" if cn.error else ""))
            result = NightlyResult(night, config.margin, results)
            _write_summary(data, store, result)
        finally:
            store.close()
    return result


def _one(store: Store, build: BuildFn, spec_file: Path, night: str, config: NightlyConfig,
         load_spec: Callable[[Path], Any]) -> CharacterNight:
    sha = hashlib.sha256(spec_file.read_bytes()).hexdigest()
    try:
        spec = load_spec(spec_file)
        character = character_name(spec)
    except Exception as exc:  # noqa: BLE001 - a broken spec is that character's failure only
        return CharacterNight(character=spec_file.stem, spec_file=str(spec_file), state="failed",
                              error=f"spec {spec_file.name}: {exc}")
    row = store.nightly_run(night, character)
    if row is not None and row.state == "succeeded":
        cn = CharacterNight(character, str(spec_file), "succeeded", row.build_id, dict(row.scores), reused=True)
    else:
        resume = row.build_id if row is not None and row.state == "running" else ""
        store.start_nightly(night, character, str(spec_file), sha)
        started = [resume]

        def record(build_id: str) -> None:
            started[0] = build_id
            store.set_nightly_build(night, character, build_id)

        try:
            outcome = build(spec, spec_file, config.build_options(), resume, record)
        except Exception as exc:  # noqa: BLE001 - one failing character must not stop the others
            outcome = BuildOutcome(build_id=started[0], state="failed", error=f"{type(exc).__name__}: {exc}")
        scores = outcome.scores if outcome.state == "succeeded" else {}
        store.finish_nightly(night, character, outcome.state, outcome.build_id, scores,
                       outcome.error or ("" if outcome.state == "succeeded" else outcome.state))
        cn = CharacterNight(character, str(spec_file), outcome.state, outcome.build_id, dict(scores),
                            error=outcome.error or ("" if outcome.state == "succeeded" else f"build {outcome.state}"))
    if cn.state == "succeeded":
        prev = store.previous_nightly_success(character, night)
        if prev is not None:
            before = dict(prev.scores)
            cn.previous = {"night": prev.night, "build_id": prev.build_id, "scores": before}
            cn.regressions = compare_scores(cn.scores, before, config.margin)
    return cn


# ------------------------------------------------------------------ build functions

def embedded_builder(data_dir: Path, *, device: str = "", progress: ProgressFn | None = None) -> BuildFn:
    """Build in this process through likeness.build.runner over ``data_dir``'s store (resumes an interrupted build).

    Models are loaded once and shared by every character of the night.
    """
    from likeness.backends.cache import ModelCache

    models = ModelCache()

    def build(spec: Any, spec_file: Path, options: dict[str, Any], resume_build_id: str,
              started: Callable[[str], None]) -> BuildOutcome:
        from likeness.build.runner import run_build
        from likeness.build.worker import detect_devices

        name = character_name(spec)
        dev = device or detect_devices()[0]
        store = Store(data_dir)
        try:
            row = None
            if resume_build_id:
                try:
                    row = store.get_build(resume_build_id)
                except NotFound:
                    row = None
                if row is not None and row.terminal:
                    row = None
            if row is None:
                try:
                    store.get_character(name)
                except NotFound:
                    store.create_character(name, spec.to_dict())
                # Created already running on this process's device: never queued, so a server on
                # the same data dir cannot claim it and a cancel is seen by this run.
                row = store.create_build(spec.to_dict(), options, character=name, running_on=dev)
            started(row.id)
            run_build(store, row.id, device=dev, models=models, progress=progress)
            final = store.get_build(row.id)
            if final.state != "succeeded":
                return BuildOutcome(final.id, final.state, {}, final.error or final.state)
            return BuildOutcome(final.id, "succeeded", _report_scores(store.build_dir(final.id)))
        finally:
            store.close()

    return build


def _report_scores(build_dir: Path) -> dict[str, float | None]:
    path = build_dir / layout.REPORT_DIR / layout.REPORT_JSON
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
    else:
        from likeness.report.document import build_report

        doc = build_report(build_dir)
    return dict(doc["summary"]["scores"])


def service_builder(address: str, *, token: str = "", timeout: float | None = None) -> BuildFn:
    """Build through a running Likeness service (``likeness nightly --server HOST:PORT``)."""

    def build(spec: Any, spec_file: Path, options: dict[str, Any], resume_build_id: str,
              started: Callable[[str], None]) -> BuildOutcome:
        from likeness.serve.client import LikenessClient

        with LikenessClient(address, token=token) as client:
            build_id = ""
            if resume_build_id:
                try:
                    b = client.get_build(resume_build_id)
                    build_id = b.id if _state_name(b) not in ("failed", "cancelled") else ""
                except Exception:  # noqa: BLE001 - gone: start a new one
                    build_id = ""
            if not build_id:
                build_id = client.start_build(spec=spec, options=options).id
            started(build_id)
            final = client.wait_build(build_id, timeout=timeout)
            state = str(final.state).lower() if not isinstance(final.state, int) else _state_name(final)
            if state != "succeeded":
                return BuildOutcome(build_id, state or "failed", {}, getattr(final, "error", "") or state)
            rep = json.loads(client.get_report(build_id).json)
            return BuildOutcome(build_id, "succeeded", dict(rep["summary"]["scores"]))

    return build


def _state_name(build: Any) -> str:
    """A protobuf enum state as the store's word ("BUILD_STATE_SUCCEEDED" -> "succeeded")."""
    try:
        name = type(build).DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[build.state].name
    except (AttributeError, KeyError):
        return str(build.state)
    return name.lower().rsplit("_", 1)[-1]


# ------------------------------------------------------------------ summary

def _write_summary(data: Path, store: Store, result: NightlyResult) -> None:
    from likeness.report.nightly_page import nightly_page

    out = data / "nightly" / result.night
    trends: dict[str, dict[str, Any]] = {}
    for c in result.characters:
        rows = store.nightly_series(c.character, result.night)
        series = {}
        for name in TREND_SCORES:
            vals = [r.scores.get(name) for r in rows]
            if any(isinstance(v, (int, float)) for v in vals):
                series[name] = vals
        trends[c.character] = {"nights": [r.night for r in rows], "series": series}
    doc = dict(result.to_dict(), trends=trends, generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    doc.pop("summary_json"), doc.pop("summary_html")
    result.summary_json = str(atomic_write_json(out / "summary.json", doc))
    result.summary_html = str(atomic_write_text(out / "summary.html", nightly_page(doc)))
