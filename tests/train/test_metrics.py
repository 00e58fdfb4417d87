"""metrics.jsonl (one JSON object per line, cut back to the checkpoint on resume) and loss.png."""

from lorakit.train.loss_plot import draw
from lorakit.train.metrics import METRICS_FILE, PLOT_FILE, MetricsLog, plot_losses, read_metrics


def test_records_append_and_resume_drops_later_steps(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 3, "eval_loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2, 3, 3]
    MetricsLog(tmp_path, resume_step=2)  # resumed from step 2: steps 3.. will be written again
    assert read_metrics(tmp_path / METRICS_FILE) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    MetricsLog(tmp_path)  # a fresh run starts an empty file
    assert read_metrics(tmp_path / METRICS_FILE) == []


def test_plot_has_train_and_eval_curves(tmp_path, monkeypatch):
    import matplotlib.axes

    log = MetricsLog(tmp_path)
    for step in range(1, 7):
        log.write({"step": step, "loss": 2.0 / step})
        if step % 3 == 0:
            log.write({"step": step, "eval_loss": 1.5 / step, "eval_perplexity": 1.0})
    labels = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: labels.append((k.get("label"), list(a[0]))) or real_plot(self, *a, **k))
    assert draw(tmp_path) == 0 and (tmp_path / PLOT_FILE).stat().st_size > 1000  # in this process, to see the curves
    assert labels == [("train loss", [1, 2, 3, 4, 5, 6]), ("eval loss", [3, 6])]
    (tmp_path / PLOT_FILE).unlink()
    assert plot_losses(tmp_path) == tmp_path / PLOT_FILE and (tmp_path / PLOT_FILE).stat().st_size > 1000  # in a child
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([METRICS_FILE, PLOT_FILE])  # no temporary file left


def test_no_records_no_plot(tmp_path):
    MetricsLog(tmp_path)
    assert plot_losses(tmp_path) is None
