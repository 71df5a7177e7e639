"""`pip install -e .` (make setup) installs the gin files that `--gin_file=runs/...` resolves
against, without setuptools notices: the gin folders are packages, and the editable install is
a plain path entry."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = ("from setuptools import build_meta\n"
         "print(build_meta.build_editable('dist'))\n"
         "print(build_meta.build_wheel('dist'))\n")


def _copy_project(dest):
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("moe", "seqio_tasks", "gin_configs"):
        shutil.copytree(os.path.join(ROOT, package), os.path.join(dest, package), ignore=ignore)


def test_wheels_build_without_warnings_and_ship_every_gin_file(tmp_path):
    _copy_project(tmp_path)
    result = subprocess.run([sys.executable, "-c", BUILD], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    gin_notices = [line for line in output.splitlines()
                   if "gin_configs" in line and ("Warning" in line or "deprecated" in line)]
    assert gin_notices == []

    editable, = glob.glob(str(tmp_path / "dist" / "*.editable-*.whl"))
    names = zipfile.ZipFile(editable).namelist()
    assert not [n for n in names if n.endswith("_finder.py")]  # no import hook: a path entry
    pth, = [n for n in names if n.endswith(".pth")]
    assert zipfile.ZipFile(editable).read(pth).decode().strip() == str(tmp_path.resolve())

    wheel, = [w for w in glob.glob(str(tmp_path / "dist" / "*.whl")) if w != editable]
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".gin")}
    in_repo = {os.path.relpath(p, ROOT)
               for p in glob.glob(os.path.join(ROOT, "gin_configs", "**", "*.gin"),
                                  recursive=True)}
    assert shipped == in_repo and "gin_configs/runs/quickstart.gin" in shipped
