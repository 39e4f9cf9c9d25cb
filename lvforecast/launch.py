"""The id every process of one multi-process launch shares, read from the launcher's environment.

``srun`` with more than one task: ``slurm<SLURM_JOB_ID>.<SLURM_STEP_ID>`` (a requeued job gets the same id, and so
the run directory it resumes from). ``torchrun``: ``torchrun-<TORCHELASTIC_RUN_ID>``, or with the default id
``none`` the elastic agent's pid (every rank's parent) and ``MASTER_PORT``. A process started alone has none.
See docs/clusters-and-gpus.md.
"""

from __future__ import annotations

import os


def launch_id() -> str | None:
    """The id every rank of this launch shares, or None for a process started alone."""
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if tasks.isdigit() and int(tasks) > 1 and env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"):
        return f"slurm{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if run_id:
        # The elastic agent started every rank on this machine: its pid is their parent's, the same for all of them.
        return f"torchrun-{env.get('MASTER_PORT', '')}-{os.getppid()}"
    return None


def launch_token() -> str:
    """What ties rank 0's published reservation to this launch ("" on a bare machine): the launch id (else SLURM's
    job id) and restart count, as a requeued job shares its first attempt's run directory but not its reservation."""
    token = launch_id() or os.environ.get("SLURM_JOB_ID", "")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    return f"{token}#{restarts}" if token and restarts else token
