"""Typed errors raised by the kernel launchers on bad input."""


class KernelInputError(ValueError):
    """An argument to a kernel op has the wrong shape, dtype, device or layout."""
