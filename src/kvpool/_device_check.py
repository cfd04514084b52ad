"""One check for every ``device=`` argument: a CUDA device that is not there is a one-line
:class:`~kvpool.errors.InvalidArgumentError`, not torch's ``AssertionError: Torch not compiled with
CUDA enabled`` from deep inside the first allocation."""
from __future__ import annotations

import os

import torch

from .errors import InvalidArgumentError


def checked_device(device, what: str = "device") -> torch.device:
    """``torch.device(device)``, refusing a device string torch cannot parse and a CUDA device that is not visible.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (other device types pass through unchecked).
    what : str
        The argument's name in the message.

    Raises
    ------
    InvalidArgumentError
        Not a device, no CUDA device visible, or a CUDA index past the visible devices.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"{what}={device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"{what}={device!r} but no CUDA device is visible ({_why_no_cuda()}); pass device='cpu', or run on a "
            "machine with an NVIDIA GPU and a CUDA build of torch")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise InvalidArgumentError(f"{what}={device!r} but only {count} CUDA device(s) are visible "
                                   f"(cuda:0 to cuda:{count - 1}); pass an index below {count}")
    return dev


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES={visible!r}"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no GPU or driver"
