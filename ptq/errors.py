"""The one base class of the errors ptq explains to its user in one line (bad input, missing data or weights, an
impossible budget); the command line turns any of them into that line and a non-zero exit."""


class PtqError(Exception):
    """A problem with the input or the environment; the message says what is wrong and how to fix it. `shared`:
    every process of a distributed run met it alike, so only rank 0 reports it."""

    shared: bool = False
