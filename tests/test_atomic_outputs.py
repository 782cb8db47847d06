"""The shared atomic writers: a directory or a figure appears whole or not at all."""

import pytest

from cribo.config import atomic_directory, save_figure


def test_atomic_directory_replaces_the_old_output_in_one_step(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())  # a fresh, empty directory to fill
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # the old output stays until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary directory left


def test_atomic_directory_keeps_the_old_output_when_the_block_fails(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "plots" / "line.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in out.parent.iterdir()] == ["line.png"]


def test_save_figure_leaves_nothing_when_saving_fails(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    with pytest.raises(TypeError):
        save_figure(fig, tmp_path / "bad.png", not_a_savefig_option=1)
    assert not list(tmp_path.iterdir())
    assert not plt.fignum_exists(fig.number)
