"""Serve ``multirun_sweeps/*.yaml`` as the Hydra config group ``sweep``.

The study's sweep definitions live beside ``train.py`` in ``multirun_sweeps/`` (one file per study), not in
``conf/``. Hydra maps config groups to directories of a search-path root, so a plain ``file://`` entry would
make them primary configs; this source presents that directory as the single group ``sweep`` instead, and
the search-path plugin adds it to lvforecast's own apps (the ones whose primary config directory is a
checkout's ``conf/``, beside ``train.py``), so ``python train.py -m sweep=lr_rank`` works from any working
directory, with an editable or a regular install.

``LVFORECAST_SWEEPS_DIR`` points at another directory of sweep files.

The study presets (``studies/*.yaml``, one file per study, read by ``python study.py study=NAME``) are served the
same way, as the group ``study``: they are not options of ``conf/train.yaml``, so they stay out of ``conf/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "sweep"


def sweeps_dir(conf_dir: Path) -> Path | None:
    """The sweep directory of the lvforecast checkout whose ``conf/`` is ``conf_dir``, or None for other apps.

    ``LVFORECAST_SWEEPS_DIR`` overrides it. Otherwise it is ``multirun_sweeps/`` beside ``conf/``, when that
    directory also holds ``train.py`` (so other Hydra apps in the same environment are left alone).
    """
    if os.environ.get("LVFORECAST_SWEEPS_DIR"):
        return Path(os.environ["LVFORECAST_SWEEPS_DIR"]).resolve()
    root = conf_dir.parent
    if conf_dir.name == "conf" and (root / "train.py").is_file() and (root / "multirun_sweeps").is_dir():
        return (root / "multirun_sweeps").resolve()
    return None


class SweepsConfigSource(ConfigSource):
    """``lvsweeps://DIR``: DIR's yaml files as options of the group ``sweep`` (nothing else)."""

    group = GROUP

    @staticmethod
    def scheme() -> str:
        return "lvsweeps"

    def _file(self, config_path: str) -> Path | None:
        """The file behind ``sweep/NAME[.yaml]``, or None for any other path."""
        group, _, name = config_path.partition("/")
        if group != self.group or not name or "/" in name:
            return None
        return Path(self.path) / self._normalize_file_name(name)

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._file(config_path)
        if path is None or not path.is_file():
            raise ConfigLoadError(f"Config not found: {config_path} ({self.group} files live in {self.path})")
        text = path.read_text(encoding="utf-8")
        return ConfigResult(config=OmegaConf.create(text) if text.strip() else OmegaConf.create(),
                            path=self.full_path(), provider=self.provider, header=self._get_header_dict(text[:512]))

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", self.group) and self.available()

    def is_config(self, config_path: str) -> bool:
        path = self._file(config_path)
        return path is not None and path.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        config_path = config_path.strip("/")
        if config_path == "":
            return [self.group] if results_filter in (None, ObjectType.GROUP) and self.available() else []
        if config_path != self.group or results_filter == ObjectType.GROUP or not self.available():
            return []
        return sorted(p.stem for p in Path(self.path).glob("*.yaml"))


class StudiesConfigSource(SweepsConfigSource):
    """``lvstudies://DIR``: DIR's yaml files as options of the group ``study`` (``python study.py study=NAME``)."""

    group = "study"

    @staticmethod
    def scheme() -> str:
        return "lvstudies"


class SweepsSearchPath(SearchPathPlugin):
    """Add the sweep directory to the search path of lvforecast's apps (primary config directory ``conf/``)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            if element.provider != "main" or not element.path:
                continue
            path = element.path[len("file://"):] if element.path.startswith("file://") else element.path
            if "://" in path:
                continue
            directory = sweeps_dir(Path(path))
            if directory is not None:
                # The resolvers conf/ uses (${lv_run_name:}, ${lv_precision:}, ${lv_val_batches:}) are registered
                # wherever it is composed: the entry points, a test's compose(), a study's job configs.
                import lvforecast.experiment  # noqa: F401
                search_path.append(provider="lvforecast-sweeps", path=f"lvsweeps://{directory}")
                studies = Path(path).resolve().parent / "studies"
                if studies.is_dir():
                    search_path.append(provider="lvforecast-studies", path=f"lvstudies://{studies}")
                return
