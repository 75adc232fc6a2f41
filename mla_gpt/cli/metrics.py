"""A run's metrics: out_dir/metrics.jsonl (one JSON record per log line and per eval) and loss.png."""

import json
from pathlib import Path

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class Metrics:
    """Appends JSON records to out_dir/metrics.jsonl and redraws out_dir/loss.png."""

    def __init__(self, out_dir, resume_iter):
        self.path = Path(out_dir) / METRICS_NAME
        self.plot_path = Path(out_dir) / PLOT_NAME
        records = self.read(self.path) if resume_iter is not None and self.path.exists() else []
        self.records = [
            r for r in records if r["iter"] < (resume_iter or 0)
        ]  # drop what the resumed run redoes
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    @staticmethod
    def read(path):
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line]

    def add(self, record):
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, title):
        """Train loss per logged iteration and train/val loss per eval; skipped without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        steps = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        ax.plot(
            [r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)"
        )
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val (eval)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path)
        plt.close(fig)
