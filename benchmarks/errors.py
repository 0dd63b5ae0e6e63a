"""Exceptions of the benchmark harness."""


class NotAvailable(Exception):
    """A side of a row cannot run here (library piece missing, no peer on this platform).

    The row then says "not available" with this message; it is not an error of the run.
    """
