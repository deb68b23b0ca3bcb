"""Fixtures shared by the test files."""
import pytest

import data


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A tiny maze frame store of 4 training videos (made once per test module)."""
    out = str(tmp_path_factory.mktemp("frames") / "train")
    data.make_maze(out, data.maze_config("tiny", videos=4, workers=1), "train")
    return out
