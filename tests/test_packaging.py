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
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
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


# -- a fresh virtualenv, as the README installs it ---------------------------------

REBUILD_CACHE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"


@pytest.fixture(scope="module")
def fresh_venv(dists):
    """The wheel installed into a new virtualenv, in a directory every user
    can read; its dependencies come from this environment (a .pth file), so
    the test needs no network."""
    import site
    import tempfile

    home = tempfile.mkdtemp(prefix="dx-venv-", dir="/tmp")
    os.chmod(home, 0o755)
    venv = os.path.join(home, "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    (purelib,) = [p for p in site.getsitepackages() if p.endswith("site-packages")][:1]
    target = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(target, "dependencies.pth"), "w") as f:
        f.write(purelib + "\n")
    # The fresh venv's own pip: this environment's would also uninstall the
    # distributex it has (the editable one the other tests run).
    subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", str(dists[1])], check=True, capture_output=True, timeout=120)
    yield venv
    shutil.rmtree(home, ignore_errors=True)


def as_nobody():
    """Arguments that run a command as an unprivileged user, or () when we are one."""
    if os.geteuid() != 0:
        return ()
    runuser = shutil.which("runuser") or shutil.which("setpriv")
    if runuser is None:
        pytest.skip("neither runuser nor setpriv to run as an unprivileged user")
    if runuser.endswith("runuser"):
        return (runuser, "-u", "nobody", "--")
    return (runuser, "--reuid=65534", "--regid=65534", "--clear-groups")


def rebuilt_cache(venv):
    """Run the packager's one line (README, "Packaging notes") as the owner;
    the path of the cache it wrote beside the plugin."""
    python = os.path.join(venv, "bin", "python")
    subprocess.run([python, "-c", REBUILD_CACHE], check=True, capture_output=True, timeout=120)
    where = subprocess.run([python, "-c", "import twisted.plugins.distributex_plugin as p; print(p.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return os.path.join(os.path.dirname(where), "dropin.cache")


def twistd_help(venv, *prefix):
    # twistd is a dependency's script, outside the fresh venv: run its module.
    python = os.path.join(venv, "bin", "python")
    return subprocess.run([*prefix, python, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                          cwd="/", capture_output=True, text=True, timeout=120)


def test_after_the_cache_rebuild_twistd_never_needs_to_write_the_plugin_cache(fresh_venv):
    # A user who cannot write the cache gets a warning only when twistd
    # wants to rewrite it: after the rebuild it never does.
    cache = rebuilt_cache(fresh_venv)
    before = os.stat(cache).st_mtime_ns
    result = twistd_help(fresh_venv)
    assert result.returncode == 0 and "distributex" in result.stdout
    assert os.stat(cache).st_mtime_ns == before


def test_twistd_lists_the_plugin_without_a_cache_warning_as_an_unprivileged_user(fresh_venv):
    rebuilt_cache(fresh_venv)
    prefix = as_nobody()
    if prefix and subprocess.run([*prefix, os.path.join(fresh_venv, "bin", "python"), "-c", "pass"],
                                 capture_output=True).returncode != 0:
        pytest.skip("this Python lives where an unprivileged user cannot run it")
    result = twistd_help(fresh_venv, *prefix)
    assert result.returncode == 0, result.stderr
    assert "distributex" in result.stdout
    assert "plugin cache" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["distributex", "distributexctl"])
def test_the_console_scripts_answer_help(fresh_venv, command):
    result = subprocess.run([os.path.join(fresh_venv, "bin", command), "-h"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_the_systemd_unit_passes_systemd_analyze_verify_with_the_readmes_install_path(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (no systemd here)")
    with open(os.path.join(ROOT, "contrib", "distributex.service")) as f:
        unit = f.read()
    assert "/opt/distributex/bin/twistd" in unit, "the unit must use the README's install path"
    # The README installs into the virtualenv /opt/distributex; the one
    # running these tests, with its bin/twistd, stands in for it.
    (tmp_path / "distributex.service").write_text(unit.replace("/opt/distributex", sys.prefix))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "distributex.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == ""


def test_twist_writes_readable_lines_when_its_output_is_not_a_terminal(tmp_path):
    (tmp_path / "dx.yaml").write_text("pools: [{name: p}]\nstate_file: null\n")
    twist = os.path.join(os.path.dirname(twistd_command()[0]), "twist")
    proc = subprocess.Popen([twist, "distributex", "-c", "dx.yaml", "--listen", "tcp:0:interface=127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    proc.terminate()
    proc.communicate(timeout=30)
    assert not first.startswith("{"), first
    assert "[" in first and "starting" in first.lower()


def test_the_wheel_carries_the_status_page(dists):
    names = wheel_names(dists[1])
    assert {"distributex/page/index.html", "distributex/page/page.js", "distributex/page/page.css"} <= names
