"""job/records.py: metrics.jsonl and steps.jsonl written and read back, old files and cut ones included."""

import pytest

from job import records

EPOCH = {"epoch": 0, "train_loss": 2.1, "train_acc": 0.2, "val_loss": None, "val_acc": None, "lr": 0.05,
         "images_per_sec": 812.5, "epoch_time_s": 1.25}
FINAL = {"test_acc": 0.31, "test_loss": 1.9, "best_epoch": 1, "best_val_acc": None, "test_images": 512}


def test_lines_are_those_every_earlier_release_wrote(tmp_path):
    """Same keys, same order, same JSON: an old out_dir reads as a new one, and the reverse."""
    path = records.metrics_path(tmp_path)
    records.rewrite(path, [EPOCH])
    records.append(path, [{**EPOCH, "epoch": 1}])
    records.append(path, [records.Final(**FINAL)])
    assert path.read_text() == (
        '{"epoch": 0, "train_loss": 2.1, "train_acc": 0.2, "val_loss": null, "val_acc": null, "lr": 0.05, '
        '"images_per_sec": 812.5, "epoch_time_s": 1.25}\n'
        '{"epoch": 1, "train_loss": 2.1, "train_acc": 0.2, "val_loss": null, "val_acc": null, "lr": 0.05, '
        '"images_per_sec": 812.5, "epoch_time_s": 1.25}\n'
        '{"test_acc": 0.31, "test_loss": 1.9, "best_epoch": 1, "best_val_acc": null, "test_images": 512}\n')
    found = records.read(tmp_path)
    assert [r["epoch"] for r in found.epochs] == [0, 1] and found.final == FINAL
    assert [r.get("epoch") for r in found.lines] == [0, 1, None]


def test_a_missing_file_a_blank_line_and_a_cut_last_line_read_as_what_was_whole(tmp_path):
    assert records.read(tmp_path) == records.Records(epochs=[], final=None)
    assert records.read_steps(tmp_path) == []
    records.metrics_path(tmp_path).write_text('{"epoch": 0, "val_acc": 0.5}\n\n{"epoch": 1, "val_a')
    assert records.read(tmp_path) == records.Records(epochs=[{"epoch": 0, "val_acc": 0.5}], final=None)
    records.metrics_path(tmp_path).write_text('{"epoch": 0, "val_a\n{"epoch": 1, "val_acc": 0.5}\n')
    with pytest.raises(ValueError, match="record 1: not JSON"):  # damage before the end is not a cut write
        records.read(tmp_path)


def test_steps_jsonl_round_trips_with_the_optional_since_launch_s(tmp_path):
    steps = [records.Step(epoch=0, step=3, step_s=0.5, since_launch_s=9.0),
             records.Step(epoch=0, step=4, step_s=0.25)]
    records.append(records.steps_path(tmp_path), steps)
    assert records.steps_path(tmp_path).read_text() == (
        '{"epoch": 0, "step": 3, "step_s": 0.5, "since_launch_s": 9.0}\n{"epoch": 0, "step": 4, "step_s": 0.25}\n')
    assert records.read_steps(tmp_path) == steps
