"""The end-of-run results table: val and test side by side, nothing for runs that have neither."""

from sftlab.console import print_metrics_table


def test_metrics_table_shows_val_and_test_side_by_side(capsys):
    print_metrics_table({"val/acc": 0.9051, "test/acc": 0.8972, "train_samples_per_s": 42.0}, title="t")
    out = capsys.readouterr().out
    assert "val" in out and "test" in out and "acc" in out
    assert "0.9051" in out and "0.8972" in out


def test_metrics_table_prints_nothing_without_val_or_test(capsys):
    # a throughput benchmark (validation and test off) used to print an empty table
    print_metrics_table({"train_samples_per_s": 42.0, "status": "completed"}, title="t")
    assert capsys.readouterr().out == ""
