"""The built wheel works on its own: installed into a fresh venv, used outside the source tree.

The fresh venv gets only the wheel (``--no-deps``); its dependencies come from the dev venv's
site-packages through a ``.pth`` line. A directory added by a ``.pth`` line does not get its own
``.pth`` files processed (``site.addpackage`` appends it to ``sys.path``; only ``addsitedir``
reads ``.pth`` files), so the dev venv's editable install of this project (a ``.pth`` that loads
a finder) is invisible: every ``ntl_deepspeed`` module must come from the wheel. A subpackage
missing from ``setup.cfg`` fails here.
"""
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def run(cmd, **kwargs):
    kwargs.setdefault("timeout", 120)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


class Fresh:
    """A venv holding only the wheel, its dependencies seen through a .pth line."""

    def __init__(self, base):
        self.base = base
        # a copy of what the build reads (top-level files, the package directories): the build
        # writes build/ and *.egg-info, and a stale build/lib could hide a missing package
        self.src = os.path.join(base, "src")
        os.makedirs(self.src)
        for name in os.listdir(ROOT):
            path = os.path.join(ROOT, name)
            if name in ("ntl_deepspeed", "patches"):
                shutil.copytree(path, os.path.join(self.src, name), ignore=SKIP)
            elif os.path.isfile(path) and not name.startswith("."):
                shutil.copy(path, self.src)
        dist = os.path.join(base, "dist")
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", dist, self.src])
        (self.wheel,) = [os.path.join(dist, n) for n in os.listdir(dist) if n.endswith(".whl")]
        self.venv = os.path.join(base, "venv")
        run([sys.executable, "-m", "venv", "--without-pip", self.venv])
        self.bin = os.path.join(self.venv, "bin")
        self.python = os.path.join(self.bin, "python")
        # the wheel first (pip must not see the dev venv's editable install), then the .pth
        run([sys.executable, "-m", "pip", "--python", self.python, "install", "-q", "--no-deps",
             "--no-index", self.wheel])
        self.site = run([self.python, "-c", "import sysconfig; "
                         "print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        dev = sysconfig.get_paths()
        with open(os.path.join(self.site, "dev_venv_dependencies.pth"), "w") as f:
            f.write("\n".join(dict.fromkeys([dev["purelib"], dev["platlib"]])) + "\n")
        # what `pip install deepspeed` would put here: the launcher on this venv's python
        deepspeed = os.path.join(self.bin, "deepspeed")
        with open(deepspeed, "w") as f:
            f.write(f"#!{self.python}\nfrom deepspeed.launcher.runner import main\n\n"
                    "if __name__ == '__main__':\n    main()\n")
        os.chmod(deepspeed, 0o755)
        self.cwd = os.path.join(base, "elsewhere")  # outside the source tree
        os.makedirs(self.cwd)
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE")}
        env.update(PATH=self.bin + os.pathsep + env.get("PATH", ""), VIRTUAL_ENV=self.venv,
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                   PYTHONNOUSERSITE="1")
        self.env = env

    def run(self, cmd, **kwargs):
        return run(cmd, cwd=self.cwd, env=self.env, **kwargs)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    return Fresh(str(tmp_path_factory.mktemp("wheel")))


def source_modules():
    """Every module of the source tree, as its path inside the installed package."""
    found = set()
    for top, installed in (("ntl_deepspeed", "ntl_deepspeed"), ("patches", "ntl_deepspeed/patches")):
        base = os.path.join(ROOT, top)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            for name in filenames:
                if name.endswith(".py"):
                    found.add(os.path.normpath(os.path.join(installed, rel, name)))
    return found


def source_version():
    with open(os.path.join(ROOT, "ntl_deepspeed", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def test_wheel_holds_every_module_and_declares_ranges(fresh):
    with zipfile.ZipFile(fresh.wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(info).decode())
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    missing = sorted(source_modules() - names)
    assert not missing, f"not in the wheel (a package missing from setup.cfg?): {missing}"
    assert meta["Version"] == source_version()
    requires = meta.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    pinned = [r for r in runtime if "==" in r]
    assert not pinned, f"exact pins in install_requires: {pinned}"
    for name in ("torch", "deepspeed", "transformers", "accelerate"):
        assert any(re.match(rf"{name}\b", r) for r in runtime), f"{name} not declared"
    extras = set(meta.get_all("Provides-Extra"))
    assert {"mpi", "megatron", "triton", "test", "train"} <= extras
    assert not [r for r in runtime if re.match(r"(tqdm|matplotlib)\b", r)], \
        "the library must not require the training application's dependencies"
    assert "ntl-pretrain = ntl_deepspeed.train.cli:main" in entry_points
    assert "ntl-numbers = ntl_deepspeed.numbers.__main__:main" in entry_points


def test_dev_pins_are_inside_the_declared_ranges(fresh):
    """requirements-dev.txt (what CI installs) satisfies the wheel's requirements and extras."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    with zipfile.ZipFile(fresh.wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(info).decode())
    outside = []
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue  # extras other than test (mpi, megatron, triton are in test too)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            outside.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            outside.append(f"{req} (installed {installed})")
    assert not outside, outside


def test_imports_come_from_the_wheel(fresh):
    out = fresh.run([fresh.python, "-c",
                     "import sys, ntl_deepspeed, ntl_deepspeed.patches.transformers, "
                     "ntl_deepspeed.patches.megatron_core, ntl_deepspeed.integrations.deepspeed, "
                     "ntl_deepspeed.train.trainer, ntl_deepspeed.train.preflight; "
                     "print(ntl_deepspeed.__file__); "
                     "print(ntl_deepspeed.patches.transformers.__file__); "
                     "print(sorted(m for m in sys.modules if 'editable' in m))"]).stdout
    package, patch, editable = out.strip().splitlines()[-3:]
    site = os.path.realpath(fresh.site)
    assert os.path.realpath(package) == os.path.join(site, "ntl_deepspeed", "__init__.py")
    assert os.path.realpath(patch).startswith(os.path.join(site, "ntl_deepspeed", "patches"))
    assert editable == "[]", f"the dev venv's editable finder was loaded: {editable}"


def test_console_scripts(fresh, mistral_model_path):
    numbers = shutil.which("ntl-numbers", path=fresh.env["PATH"])
    assert numbers == os.path.join(fresh.bin, "ntl-numbers")
    out = fresh.run([numbers, mistral_model_path, "--text", "I paid 48 dollars"]).stdout
    assert "2 would receive NTL" in out and "[4=4] [8=8]" in out, out
    # no "found in sys.modules" RuntimeWarning from runpy (an error under -W error)
    proc = fresh.run([fresh.python, "-W", "error", "-m", "ntl_deepspeed.numbers", "--help"])
    assert "usage:" in proc.stdout and "Warning" not in proc.stderr, proc.stderr
    assert os.path.exists(os.path.join(fresh.bin, "ntl-pretrain"))


def test_training_run_from_the_wheel(fresh):
    out_dir = os.path.join(fresh.base, "out")
    proc = fresh.run(["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                      "--master_port", str(free_port()), "--module", "ntl_deepspeed.train.cli",
                      "--deepspeed_config", os.path.join(ROOT, "configs", "zero3_cpu_tiny.json"),
                      "--model", os.path.join(ROOT, "configs", "model", "llama_tiny.json"),
                      "--steps", "3", "--output-dir", out_dir, "--corpus-sentences", "2000",
                      "--no-plot"], timeout=240)
    # the ranks ran this venv's python, which can only import the wheel's ntl_deepspeed
    assert f"'{fresh.python}', '-u', '-m', 'ntl_deepspeed.train.cli'" in proc.stdout + proc.stderr
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3
