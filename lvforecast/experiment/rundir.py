"""Run directories: unique names, one run per directory, and a resumed run's history kept (``docs/reliability.md``);
:class:`RunDir` is a training run's directory as the run sees it (only the lead process, rank 0, writes)."""

from __future__ import annotations

import csv
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import atomic_writer, read_state, write_csv, write_text
from lvforecast.budget.status import RunStatus
from lvforecast.errors import UserError, first_line
from lvforecast.launch import launch_id

# A directory holding any of these holds a run (what train() writes; metrics.csv comes from the CSV logger).
RUN_FILES = ("config.yaml", "run_info.json", "metrics.csv", "split.json", "adapter", "checkpoints")
# Keys a continuation of the same run may change (a resume raises max_steps and names its checkpoint).
CONTINUATION_KEYS = ("ckpt_path", "trainer.max_steps")


def unique_suffix() -> str:
    """``${lv_unique:}``: the launch id every rank shares, else ``<pid>-<4 random hex digits>``, unique among runs
    started in the same second on one machine."""
    return launch_id() or f"{os.getpid()}-{secrets.token_hex(2)}"


def run_name() -> str:
    """``${lv_run_name:}``: the launch id every rank shares (no clock: ranks start on either side of a second),
    else ``<time>_<pid>-<4 hex>``."""
    return launch_id() or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{unique_suffix()}"


# Hydra's run and sweep directory names; cached per config like ${now:}, so a multirun's jobs see one sweep directory.
for _name, _fn in (("lv_unique", unique_suffix), ("lv_run_name", run_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=True)


def ledger_name(cfg: DictConfig, fallback: str) -> str:
    """The run's name in the ledger: ``budget.run_name`` (``<name>/<job number>`` in a multirun), else the job's
    overrides as Hydra names directories, else ``fallback``."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if cfg.budget.run_name:
        multirun = hc is not None and hc.mode is not None and hc.mode.name == "MULTIRUN"
        return f"{cfg.budget.run_name}/{hc.job.num}" if multirun else str(cfg.budget.run_name)
    return (hc.job.override_dirname if hc is not None else None) or fallback


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, torn or not an object (:func:`read_state`'s refusals)."""
    try:
        return read_state(path, "")
    except UserError:
        return None


def _same_config(out: Path, cfg: DictConfig) -> bool:
    """Whether ``out/config.yaml`` is ``cfg`` (resolved) up to :data:`CONTINUATION_KEYS`."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    try:
        old = OmegaConf.load(out / "config.yaml")
        for conf in (old, new):
            for key in CONTINUATION_KEYS:  # the same (null) on both sides, so they do not count
                OmegaConf.update(conf, key, None, force_add=True)
    except Exception:  # noqa: BLE001 - unreadable, or not a run's config: not the same configuration
        return False
    return old == new


def claim(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """Check that this run may write into ``out``: a UserError names another run's files there, unless this run
    resumes that one (``ckpt_path`` inside it) or restarts its configuration stopped before its first checkpoint.

    Returns:
        The directory's ``run_info.json`` on a resume (``{}`` if missing or torn); None for a fresh run or a restart.
    """
    # A folder counts only with something in it (checkpoints/ is made before the first checkpoint is).
    found = [name for name in RUN_FILES if (out / name).is_file() or any((out / name).glob("*"))]
    if not found:
        return None
    info = read_json(out / "run_info.json")
    if cfg.get("ckpt_path") and Path(cfg.ckpt_path).resolve().is_relative_to(out.resolve()):
        return info or {}
    if not any((out / "checkpoints").glob("*.ckpt")) and "final" not in (info or {}) and _same_config(out, cfg):
        return None
    last = out / "checkpoints" / "last.ckpt"
    resume = (f"continue it with resume={out} trainer.max_steps=<more steps>, or " if last.is_file() else "")
    raise UserError(
        f"paths.output_dir={str(out)!r}: the directory already holds another run's files ({', '.join(found)}); "
        f"a run never writes into another run's directory. Allowed: an empty directory, or a resume of that "
        f"run (ckpt_path inside it). Fix: {resume}leave hydra.run.dir / paths.output_dir unset (each run gets "
        f"a unique outputs/<task>/<time>_<pid>-<hex> directory, or slurm<job>.<step> for the ranks of one srun) "
        f"or choose a new one")


def write_hydra_files(out: Path, cfg: DictConfig, folder: str = ".hydra") -> None:
    """Write what Hydra writes into ``out/<folder>/`` (the composed config, Hydra's own and the overrides), once the
    run has claimed ``out``: ``conf/hydra/default.yaml`` turns Hydra's early writing off."""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        for name, node in (("config.yaml", cfg), ("hydra.yaml", {"hydra": hc}), ("overrides.yaml", hc.overrides.task)):
            write_text(out / folder / name, OmegaConf.to_yaml(node))


def override_key(override: str) -> str:
    """The key an override sets: ``+lora.r=8`` and ``~lora.r`` -> ``lora.r``."""
    return override.partition("=")[0].lstrip("+~")


def resume_argv(argv: list[str]) -> list[str]:
    """``train.py resume=<run dir> [overrides]`` as the command that continues that run: the run's own overrides
    (its ``.hydra/overrides.yaml``, read as data), the new ones, its ``checkpoints/last.ckpt`` and its directory.

    Raises:
        UserError: The folder holds no run to continue, a recorded override is not a plain value, or the command
            also sets what ``resume=`` sets (``-m``, ``ckpt_path``, ``hydra.run.dir``).
    """
    import yaml

    given = [a for a in argv[1:] if override_key(a) == "resume"]
    if not given:
        return argv
    run = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    rest = [a for a in argv[1:] if a not in given]
    if clash := [a for a in rest if a in ("-m", "--multirun") or override_key(a) in ("ckpt_path", "hydra.run.dir")]:
        raise UserError(f"resume={run}: continues that one run from its last checkpoint, in its directory; drop "
                        f"{' '.join(clash)}")
    ckpt, recorded = run / "checkpoints" / "last.ckpt", run / ".hydra" / "overrides.yaml"
    if missing := [str(p) for p in (recorded, ckpt) if not p.is_file()]:
        raise UserError(f"resume={run}: no run to continue there (missing {', '.join(missing)}); give the directory "
                        f"of a run started with `python train.py` that wrote a checkpoint")
    try:
        overrides = yaml.safe_load(recorded.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{recorded}: not a readable list of overrides ({first_line(err)})") from err
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{recorded}: not a list of override strings; it is what `python train.py` wrote there")
    # Read as data: nothing that would name code (instantiation keys, hydra's callbacks) or resolve the environment.
    if bad := [o for o in overrides if "${" in o or override_key(o).startswith("hydra")
               or any(part.startswith("_") for part in override_key(o).split("."))]:
        raise UserError(f"{recorded}: refused, a run directory is read as data: {bad} would name code or resolve "
                        f"values; start the run again with the overrides you mean")
    new = {override_key(a) for a in rest}
    kept = [o for o in overrides if override_key(o) not in new | {"ckpt_path", "hydra.run.dir"}]
    return [argv[0], *kept, *rest, f"ckpt_path={ckpt}", f"hydra.run.dir={run}"]


def metrics_history(out: Path, upto_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of ``out/metrics.csv`` of optimizer steps 1..``upto_step`` (a resume redoes the later
    ones); UserError if it exists but is not a readable CSV."""
    path = out / "metrics.csv"
    if not path.is_file():
        return [], []
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            # Lightning's step column is the optimizer step minus one (a step-k row says "after k steps" as k-1).
            rows = [r for r in reader if float(r.get("step") or 0) < upto_step]
            header = list(reader.fieldnames or [])
    except (OSError, ValueError, csv.Error) as err:
        raise UserError(f"{path}: cannot read the run's metrics history ({err}); fix: repair or move the file "
                        f"aside (the resumed run then starts a new metrics.csv)") from err
    return header, rows


def install_history(loggers: list[Any], out: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    """Make every CSV logger writing ``out/metrics.csv`` keep ``rows`` and append after them (Lightning's writer
    would delete the file), rewriting it atomically when new columns appear."""
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class _HistoryWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # keep the history: no delete
            pass

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            with open(self.metrics_file_path, newline="") as fh:
                old = list(csv.DictReader(fh))
            with atomic_writer(self.metrics_file_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(old)

    for lg in loggers:
        if not isinstance(lg, CSVLogger) or Path(lg.log_dir).resolve() != out.resolve():
            continue
        path = out / ExperimentWriter.NAME_METRICS_FILE
        if rows:
            write_csv(path, [{k: row[k] for k in sorted(header)} for row in rows])
        elif path.exists():
            path.unlink()  # a restart: the stopped attempt's rows are not this run's history
        os.makedirs(lg.root_dir, exist_ok=True)
        writer = _HistoryWriter(log_dir=lg.log_dir)
        writer.metrics_keys = sorted(header) if rows else []
        lg._experiment = writer  # noqa: SLF001 - the logger's experiment is created lazily; this is it


def segments(previous: dict[str, Any] | None, start_step: int, ckpt_path: str | None) -> list[dict[str, Any]]:
    """The segments of ``previous`` (``run_info.json`` on a resume; one without segments is one segment to its
    final step, one still ``running`` was killed: ``interrupted``) and a new ``running`` one from ``start_step``."""
    previous = previous or {}
    old = [dict(s) for s in previous.get("segments") or [] if isinstance(s, dict)]
    if not old and isinstance(previous.get("final"), dict):
        old = [{"start_step": 0, "end_step": previous["final"].get("global_step"),
                "status": previous["final"].get("budget_status")}]
    for seg in old:
        if seg.get("status") == RunStatus.RUNNING:
            seg["status"] = RunStatus.INTERRUPTED.value
            seg["end_step"] = seg.get("end_step") if seg.get("end_step") is not None else start_step
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return old + [{"start_step": start_step, "end_step": None, "status": RunStatus.RUNNING.value, "started": now,
                   "ended": None, "ckpt_path": ckpt_path}]


@dataclass
class RunDir:
    """A training run's directory ``out``; ``lead``: whether this process writes it (rank 0), ``start_step``: the
    checkpoint's step on a resume, else 0; ``info``: ``run_info.json`` as written."""

    out: Path
    lead: bool
    start_step: int
    resumes: dict[str, Any] | None  # claim(): the run_info.json of the run this one continues, None if fresh
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: DictConfig, start_step: int, lead: bool) -> RunDir:
        """Claim ``paths.output_dir`` (never another run's), write ``.hydra/`` and the resolved ``config.yaml``."""
        out = Path(cfg.paths.output_dir)
        run = cls(out, lead, start_step, claim(cfg, out) if lead else None)
        out.mkdir(parents=True, exist_ok=True)
        if lead:  # a resume keeps the run's own .hydra/ and records its command beside it
            write_hydra_files(out, cfg, ".hydra" if run.resumes is None else f".hydra/resume-step{start_step}")
        run.write("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return run

    def write(self, name: str, text: str) -> None:
        """Write ``name`` atomically, in the lead process only."""
        if self.lead:
            write_text(self.out / name, text)

    def begin(self, record: dict[str, Any], loggers: list[Any], ckpt_path: str | None) -> None:
        """Start this run's segment: write ``run_info.json`` (``record`` and the segments), and keep
        ``metrics.csv`` up to the checkpoint's step on a resume in the same directory (appended to after it)."""
        self.info = {**record, "segments": segments(self.resumes, self.start_step, ckpt_path)}
        if self.lead:
            header, rows = metrics_history(self.out, self.start_step) if self.resumes is not None else ([], [])
            install_history(loggers, self.out, header, rows)
        self.write("run_info.json", json.dumps(self.info, indent=1))

    def end(self, step: int, status: str, **record: Any) -> None:
        self.info["segments"][-1].update(end_step=step, status=str(status), ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.info.update(record)
        self.write("run_info.json", json.dumps(self.info, indent=1))
