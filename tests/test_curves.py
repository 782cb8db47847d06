import json

import pandas as pd

from cribo.cli import main
from cribo.results.curves import training_curves


def _steps(folder, records):
    folder.mkdir(parents=True)
    (folder / "log_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_curves_one_column_per_run_resumed_steps_deduplicated(tmp_path):
    a = _steps(tmp_path / "a", [{"step": 0, "loss": 5.0}, {"step": 10, "loss": 4.0},
                                {"step": 10, "loss": 3.5}, {"step": 20, "loss": 3.0}])  # step 10 redone after a kill
    b = _steps(tmp_path / "b", [{"step": 0, "loss": 6.0}, {"step": 10, "loss": 5.0}])
    (tmp_path / "random").mkdir()  # a baseline: no steps, no column
    frame = training_curves({"cribo": a, "dino": b, "random": tmp_path / "random"})
    assert list(frame.columns) == ["cribo", "dino"]
    assert frame.loc[10, "cribo"] == 3.5 and pd.isna(frame.loc[20, "dino"])
    out = tmp_path / "curves.tsv"
    assert main(["curves", "--runs", f"cribo={a}", f"dino={b}", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "step\tcribo\tdino"
    assert main(["curves", "--runs", "no-folder-given", "--out", str(out)]) == 2
