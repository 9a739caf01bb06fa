"""The package installs anywhere: an sdist built from this checkout, a wheel built from that sdist,
installed with ``--no-deps`` into a new venv in a temporary folder, serves every embedded model
and keeps its job store out of site-packages. Offline: the new venv sees the dependencies through
a ``.pth`` line naming this environment's site-packages (a bare path: that folder's own ``.pth``
files, among them the checkout's editable install, are not run), and it runs from a temporary
working directory, so the checkout itself is not importable there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ["grf-32", "phantom-64", "darcy-64", "phantom-flow-64", "poisson-64", "helmholtz-64"]

#: what the installed code reports about itself (one JSON line)
PROBE = """
import json, service, service.client, reconserve_client, models.checkpoint as c, service.settings as s
print(json.dumps({"service": service.__file__, "checkpoints": str(c.default_checkpoint_dir()),
                  "examples": str(s.examples_dir()), "data_dir": str(s.Settings(device="cpu").data_dir),
                  "client": reconserve_client.__file__, "one_client": service.client.Client is reconserve_client.Client}))
"""


def _run(cmd, cwd, env=None, timeout=300) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _build_wheel(tmp: Path) -> Path:
    """sdist of the checkout, then the wheel from the unpacked sdist (no stale ``build/``)."""
    dist = tmp / "dist"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])",
          str(dist)], cwd=ROOT)
    (sdist,) = dist.glob("reconserve-*.tar.gz")
    with tarfile.open(sdist) as t:
        t.extractall(tmp / "src", filter="data")
    (src,) = (tmp / "src").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(src)], cwd=tmp)
    (wheel,) = dist.glob("reconserve-*.whl")
    return wheel


def _new_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A venv without pip, the wheel installed by this environment's pip; its site-packages."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).strip())
    (site / "reconserve-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp)
    return env_dir, site


@pytest.mark.slow
def test_the_wheel_installed_outside_the_checkout_serves_every_embedded_model(tmp_path):
    wheel = _build_wheel(tmp_path)
    env_dir, site = _new_venv(tmp_path, wheel)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECONSERVE_", "PYTHON", "XDG_"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")

    where = json.loads(_run([str(env_dir / "bin" / "python"), "-c", PROBE], cwd=work, env=env))
    assert Path(where["service"]).is_relative_to(site), where  # the wheel's code, not the checkout's
    assert Path(where["client"]).is_relative_to(site) and where["one_client"], where  # the light client shipped too
    assert Path(where["checkpoints"]) == site / "models" / "checkpoints"
    assert (Path(where["examples"]) / "phantom-request.json").is_file()
    assert Path(where["data_dir"]) == home / ".local" / "share" / "reconserve"  # not in site-packages
    assert not list(site.glob("models/checkpoints/*/resume.safetensors"))  # no optimizer state shipped
    assert {p.name for p in (site / "service" / "web").iterdir()} >= {"index.html", "app.js", "style.css"}  # the page at /

    listed = _run([str(env_dir / "bin" / "reconserve"), "models"], cwd=work, env=env)
    assert sorted(line.split()[0] for line in listed.splitlines() if line.strip()) == sorted(EMBEDDED), listed
