"""Typed errors raised by the kernel launchers on bad input."""


class KernelInputError(ValueError):
    """An argument to a kernel op has the wrong shape, dtype, device or layout."""


def expect(cond: bool, msg: str) -> None:
    """Raise KernelInputError(msg) unless cond holds."""
    if not cond:
        raise KernelInputError(msg)
