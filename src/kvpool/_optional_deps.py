"""Optional dependencies: a clear :class:`~kvpool.errors.MissingDependencyError` instead of a bare
``ModuleNotFoundError`` when a part of kvpool that needs them is used.

``pip install kvpool`` brings the planner, the CLI, the allocator and the metrics (numpy, rich,
matplotlib, prometheus_client). The GPU data path (pages, block tables, kernels, start-up sizing)
needs the ``gpu`` extra (torch, triton); ``python -m kvpool.demo`` the ``demo`` extra (torch,
transformers for ``--check-hf``; tqdm only draws its progress bar).
"""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

from .errors import MissingDependencyError

# top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF = {"torch": "gpu", "triton": "gpu", "transformers": "demo", "tqdm": "demo"}


def missing_dependency_error(module: str, needed_by: str, extra: str | None = None) -> MissingDependencyError:
    """The error for ``needed_by`` (what the user called) lacking ``module``, naming the extra to install."""
    extra = extra or EXTRA_OF.get(module, "gpu")
    torch_hint = ("; on a GPU machine first install the torch build for your CUDA version, "
                  "https://pytorch.org/get-started/locally/" if module == "torch" else "")
    return MissingDependencyError(
        f"{needed_by} needs {module}, which is not installed: pip install \"kvpool[{extra}]\" "
        f"(from a source checkout: pip install \".[{extra}]\"{torch_hint})",
        name=module)


def translate(err: ModuleNotFoundError, needed_by: str, extra: str | None = None) -> BaseException:
    """``err`` as a :class:`MissingDependencyError` when it is about an optional dependency, else ``err``."""
    if err.name not in EXTRA_OF:
        # another module, or a submodule of an installed package ("torch._C": a broken torch
        # install, not a missing one): keep the original error
        return err
    return missing_dependency_error(err.name, needed_by, extra)


def require(module: str, needed_by: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that installs it.

    Examples
    --------
    >>> require("numpy", "the planner").__name__
    'numpy'
    """
    try:
        return import_module(module)
    except ModuleNotFoundError as err:
        friendly = translate(err, needed_by, extra)
        if friendly is err:
            raise
    raise friendly from None  # the message says it all: which module, for what, and how to install it
