"""The built distributions carry the twistd plugin the right way (STYLE.md,
"Packaging a twistd plugin"), and twistd finds it from anywhere."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from servers import ROOT, twistd_command

pytestmark = pytest.mark.timeout(300)

PLUGIN = "twisted/plugins/distributex_plugin.py"
SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                              ".pytest_cache", "*.pyc", "*.log", "*.sock")


def _build_args():
    """Build without an isolated environment when this one can build wheels
    (no download); otherwise let `build` fetch setuptools and wheel."""
    if importlib.util.find_spec("wheel") is not None:
        return ["--no-isolation"]
    import setuptools
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return ["--no-isolation"] if (major, minor) >= (70, 1) else []


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """An sdist and a wheel built from it, from a copy of the working tree
    (a stale twisted/plugins/dropin.cache included, as a developer has one)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)
    out = base / "dist"
    result = subprocess.run([sys.executable, "-m", "build", *_build_args(), "--outdir", str(out), str(source)],
                            capture_output=True, check=False, timeout=240)
    assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return base, wheel, sdist


def wheel_names(wheel):
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def sdist_names(sdist):
    with tarfile.open(sdist) as t:
        return {name.split("/", 1)[1] for name in t.getnames() if "/" in name}


def test_the_wheel_contains_the_plugin_file(dists):
    assert PLUGIN in wheel_names(dists[1])


def test_the_wheel_has_no_twisted_init(dists):
    assert "twisted/__init__.py" not in wheel_names(dists[1])


def test_the_wheel_has_no_twisted_plugins_init(dists):
    assert "twisted/plugins/__init__.py" not in wheel_names(dists[1])


def test_the_wheel_has_no_dropin_cache(dists):
    # A cache shipped in the wheel would overwrite the one in Twisted's own
    # plugin directory and could hide every other plugin.
    assert not [n for n in wheel_names(dists[1]) if n.endswith("dropin.cache")]


def test_the_wheel_puts_nothing_else_under_twisted(dists):
    assert {n for n in wheel_names(dists[1]) if n.startswith("twisted/")} == {PLUGIN}


def test_the_sdist_contains_the_plugin_file(dists):
    assert PLUGIN in sdist_names(dists[2])


def test_the_sdist_contains_the_example_config(dists):
    assert "distributex.yaml.example" in sdist_names(dists[2])


def test_twistd_finds_the_plugin_installed_from_the_wheel(dists):
    base, wheel, _ = dists
    target = base / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=120)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    probe = ("import twisted.plugins.distributex_plugin as p; print(p.__file__); "
             "from twisted.plugin import getPlugins; "
             "from twisted.application.service import IServiceMaker; "
             "print(sorted(m.tapname for m in getPlugins(IServiceMaker)))")
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", probe], cwd=str(elsewhere), env=env,
                            capture_output=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    where, names = result.stdout.decode().splitlines()
    assert where.startswith(str(target))
    assert "'distributex'" in names


def test_twistd_help_lists_distributex_from_an_unrelated_directory(tmp_path):
    result = subprocess.run(twistd_command() + ["--help"], cwd=str(tmp_path), capture_output=True, check=False, timeout=60)
    assert result.returncode == 0
    commands = [line.split()[0] for line in result.stdout.decode().splitlines()
                if line.startswith("    ") and line.split()]
    assert "distributex" in commands
