"""What users install is what we test: the wheel built from this tree, installed into a fresh virtual
environment, carries every package and every shipped file, and its commands work.

Glossary:
    wheel        ``pip wheel --no-deps .`` (setuptools, as ``pip install .`` builds it; with this environment's
                 setuptools when it is recent enough to build wheels by itself, so no network is needed)
    fresh venv   ``python -m venv`` with no mmspec in it; the wheel is installed with ``pip --no-deps`` and the
                 dependencies are borrowed from the running environment through a ``.pth`` line (so the test
                 needs no network); a path added that way is not a site directory, so the running
                 environment's editable mmspec (its own ``.pth`` finder) is not seen
    package      a folder with an ``__init__.py`` under the product's folders (``setup.py``'s ``ROOTS``)
    shipped file a file ``mmspec/zoo/weights/SHA256SUMS`` names
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import runpy
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from net_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.extended


def tree_packages() -> list[str]:
    """Every package of the tree by import name (what the wheel must carry)."""
    layout = runpy.run_path(str(ROOT / "setup.py"), run_name="layout")
    found = []
    for folder, name in layout["ROOTS"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.append(".".join((name, *rel)))
    return sorted(found)


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 builds wheels by itself (older ones need the ``wheel`` package)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # build with this environment's setuptools when it can (no network), else in pip's isolated build environment
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(ROOT)],
                   check=True, cwd=out)
    (path,) = out.glob("mmspec-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (dependencies from the running environment)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # every site-packages directory the running interpreter sees (its own, and any a .pth line added)
    deps = sorted({p for p in (*sys.path, *site.getsitepackages(), sysconfig.get_paths()["purelib"])
                   if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()})
    (purelib / "mmspec_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    return root


def run_in(venv: Path, args: list[str], tmp_path: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               MMSPEC_CACHE=env.get("MMSPEC_CACHE", str(Path.home() / ".cache" / "mmspec")))
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_every_package_and_every_shipped_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = sorted({n.rpartition("/")[0].replace("/", ".") for n in names if n.endswith("/__init__.py")})
    assert in_wheel == tree_packages()
    sums = (ROOT / "mmspec" / "zoo" / "weights" / "SHA256SUMS").read_text().split("\n")
    shipped = {f"mmspec/zoo/weights/{line.split(maxsplit=1)[1].strip()}" for line in sums if line.strip()}
    assert shipped - set(names) == set()
    assert "mmspec/zoo/weights/SHA256SUMS" in names


def test_every_package_imports_from_the_installed_wheel_and_the_weights_verify(venv, tmp_path):
    code = ("import importlib, json, sys\n"
            f"mods = {tree_packages()!r}\n"
            "files = {m: importlib.import_module(m).__file__ for m in mods}\n"
            "from mmspec.zoo import verify_checksums\n"
            "verify_checksums()\n"
            "print(json.dumps(files))\n")
    proc = run_in(venv, [str(venv / "bin" / "python"), "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    outside = {m: f for m, f in files.items() if not f.startswith(str(venv))}
    assert not outside, f"imported from outside the installed wheel: {outside}"


def test_mmspec_collaborate_runs_from_the_wheel(venv, tmp_path):
    proc = run_in(venv, [str(venv / "bin" / "mmspec"), "collaborate", "--max-new-tokens", "4", "--no-compare"],
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated text:" in proc.stdout


def test_mmspec_pipeline_runs_from_the_wheel_under_torchrun(venv, tmp_path):
    out = tmp_path / "result.json"
    proc = run_in(venv, [str(venv / "bin" / "python"), "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "mmspec",
                         "pipeline", "--example", "--drafter", "truncated", "--max-new-tokens", "6", "--out", str(out)],
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(out.read_text())["tokens"]) == 6


def test_mmspec_run_works_from_the_wheel(venv, tmp_path):
    out = tmp_path / "out"
    proc = run_in(venv, [str(venv / "bin" / "mmspec"), "run", "--out", str(out), "--num-images", "1"], tmp_path,
                  timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.json").is_file() and (out / "acceptance_heatmap.png").is_file()
