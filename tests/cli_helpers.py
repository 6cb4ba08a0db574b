"""Running the CLI in tests, and the one contract every command keeps for a user mistake."""

from __future__ import annotations

from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from sequoia_cli.main import app

runner = CliRunner()


def invoke(*args: object) -> Result:
    """``sequoia ARGS...`` in-process; arguments may be paths or numbers."""
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result: Result, words: str, *unwritten: Path) -> None:
    """Exit code 2, exactly one stderr line ``error: ...`` that mentions ``words``, no
    traceback, and none of the ``unwritten`` paths left behind."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.output
    for path in unwritten:
        assert not Path(path).exists(), f"{path} was written"


def cache_profiles(target_dir: str, medians: dict[str, list[float]]) -> None:
    """This device's cached profiles of the target, as if measured here."""
    import numpy as np

    from sequoia.device import fingerprint
    from sequoia.profile import LatencyGrid, Profile
    from sequoia.profile_cache import model_name, profile_path

    fp = fingerprint("cpu")
    for dtype, ms in medians.items():
        samples = np.repeat(np.asarray(ms, dtype=float)[None, :, None], 3, axis=2)
        grid = LatencyGrid(model_name(target_dir), (64,), (1, 2, 4, 8, 16), samples)
        Profile(grid, {"dtype": dtype, "fingerprint": fp}, {}).save(profile_path(fp, model_name(target_dir), dtype))
