"""Stage `report`: figures (`figures.py`, which imports no stage, so every stage may draw with it) and the
self-contained HTML page (`html.py`), which reads run folders."""
from .figures import *  # noqa: F401,F403


def __getattr__(name: str):
    # The comparison files are written by the compare study; kept importable here, where they used to live,
    # without making the figures depend on the study stage.
    if name == "write_comparison":
        from ..study.compare import write_comparison

        return write_comparison
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
