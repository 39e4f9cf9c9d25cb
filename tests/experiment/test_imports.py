"""Importing any module of the package touches no disk, network or GPU (STYLE: no import-time side effects)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest
from conftest import ROOT

import lvforecast

PROBE = """
import importlib, socket, sys

def no_network(*args, **kwargs):
    raise AssertionError("a module opened a socket at import time")

socket.socket.connect = no_network
socket.create_connection = no_network
for name in sys.argv[1:]:
    importlib.import_module(name)
torch = sys.modules.get("torch")
assert torch is None or not torch.cuda.is_initialized(), "CUDA was initialised at import time"
print(len(sys.argv) - 1)
"""


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(lvforecast.__path__, prefix="lvforecast."))


def test_the_package_has_the_sub_packages_it_documents():
    subpackages = {m.name for m in pkgutil.iter_modules(lvforecast.__path__) if m.ispkg}
    assert subpackages == {"data", "model", "budget", "evaluation", "experiment", "tracking"}


@pytest.mark.slow
def test_every_module_imports_without_touching_disk_network_or_gpu(tmp_path, tmp_path_factory):
    modules = _modules()
    assert len(modules) > 30  # the walk found the tree, not just the top package
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "LVFORECAST_ROOT": str(tmp_path), "LVFORECAST_CACHE": str(tmp_path / "c"),
           "WANDB_DIR": str(tmp_path / "w"), "PYTHONDONTWRITEBYTECODE": "1",
           # The tree walked above, whichever checkout the environment's editable install points at.
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # pytorch_lightning imports matplotlib, which builds its font cache on first import: a third-party
           # cache, kept outside the folder this test watches.
           "MPLCONFIGDIR": str(tmp_path_factory.mktemp("mplconfig"))}
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(len(modules))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p != home)
    assert written == [], f"importing wrote {written}"


@pytest.mark.slow
def test_a_config_error_answers_before_torch_lightning_or_transformers_load(tmp_path):
    # A misspelt override is the most common mistake: its message must not wait for seconds of imports. (With
    # trainer.accelerator=auto, the default, torch loads to resolve trainer.precision: is there a GPU?)
    probe = ("import runpy, sys\nsys.argv = ['train.py', 'seed=abc', 'trainer=cpu']\ntry:\n"
             "    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as stop:\n"
             "    heavy = {'torch', 'pytorch_lightning', 'transformers', 'peft'}\n"
             "    print('exit', stop.code, sorted(heavy & set(sys.modules)))\n")
    env = {**os.environ, "LVFORECAST_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert "seed='abc'" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "exit 1 []", proc.stdout
