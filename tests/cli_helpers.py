"""Running the command line in-process, and what a user-error exit must look like."""
from click.testing import CliRunner

from placement.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *words):
    """A non-zero exit with exactly one line of output, no traceback, naming each of `words`."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
