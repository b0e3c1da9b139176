"""Running the ``fastmeta`` command line in-process, for the CLI tests."""
from fastmeta.cli import main


def run_cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``fastmeta argv`` run in-process."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments):
    """A user error: status 2, one line ``fastmeta: error: ...`` naming every fragment."""
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastmeta: error: "), err
    assert "Traceback" not in err and "usage:" not in err and "usage:" not in out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
