"""An earlier release of the worker, run from its own source: its commit's files (`git archive`, not a worktree:
that would write into .git) in a directory of the test's, run by this virtualenv's interpreter with that
directory first on its path, and only the STREAMS_* variables that release knows (it refuses the others)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.config import Settings
from tests.conftest import ROOT
from tests.integration.kit.process import Worker, worker_env

# what the release says of itself, asked the way its worker is started (same interpreter, directory, variables):
# where its `streams` package comes from (the virtualenv installs this checkout in editable mode, whose import
# hook must not win) and the names of its settings' variables
_ASK = ("import dataclasses, streams, streams.config as c; print(streams.__file__); "
        "print(' '.join(c.env_name(f.name) for f in dataclasses.fields(c.Settings)))")


@dataclass(frozen=True)
class Release:
    tag: str
    commit: str
    source: Path  # the commit's files
    variables: frozenset[str]  # the STREAMS_* variables it knows

    def env(self, settings: Settings) -> dict[str, str]:
        """The worker's environment for `settings`, less the settings added since this release (it would refuse
        them, as an unknown variable)."""
        env = {k: v for k, v in worker_env(settings).items()
               if not k.startswith("STREAMS_") or k in self.variables}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.source), os.environ.get("PYTHONPATH")]))
        return env


def extract_release(tag: str, commit: str, dest: Path) -> Release:
    """`commit`'s files in `dest`, checked to be what its interpreter imports."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.fail(f"git archive {commit} ({tag}) failed: {archive.stderr.decode(errors='replace').strip()} "
                    f"(a shallow clone lacks it: git fetch --unshallow)", pytrace=False)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), os.environ.get("PYTHONPATH")]))
    ask = subprocess.run([sys.executable, "-c", _ASK], cwd=dest, env=env, capture_output=True, text=True,
                         timeout=60)
    assert ask.returncode == 0, f"{tag}'s streams does not import:\n{ask.stderr}"
    where, names = ask.stdout.splitlines()
    assert Path(where).resolve() == (dest / "streams" / "__init__.py").resolve(), \
        f"{tag}'s worker would import {where}, not the release's source in {dest}"
    return Release(tag, commit, dest, frozenset(names.split()))


class ReleaseWorker(Worker):
    """`python -m streams worker` of `release`, from its source directory (the working directory comes first on
    a `-m` run's path: this checkout's would win); otherwise a `Worker`."""

    def __init__(self, release: Release, settings: Settings, log_path: Path, name: str) -> None:
        super().__init__(settings, log_path, name, cwd=release.source, env=release.env(settings),
                         label=f"{release.tag} ({release.commit[:7]}) ")
