"""Where a step's metrics go: TensorBoard, ``metrics.jsonl``, a one-line summary, a reward plot.

Only rank 0 writes. On resume, lines of ``metrics.jsonl`` past the resumed step are dropped, so
the file always describes one consistent run (a fresh start drops every line, the step-0 eval row
of an attempt that saved nothing included). A row with held-out eval metrics gets its own
console line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SUMMARY_KEYS = (
    ("reward/mean", "reward {:.3f}"),
    ("loss", "loss {:.4g}"),
    ("response_length/mean", "len {:.1f}"),
    ("rollout/logprob_abs_diff/mean", "lp_diff {:.1e}"),
    ("time/step", "{:.1f}s"),
)
EVAL_KEYS = (("reward", "reward {:.3f}"), ("response_length", "len {:.1f}"))


class MetricsLogger:
    """TensorBoard scalars + JSON lines + stdout summary (+ PNG of the reward curve)."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        purge = resume_step + 1 if resume_step else 0  # a fresh start replaces a step-0 point too
        # TensorBoard's own writer thread flushes every 10 s and at close(); metrics.jsonl is
        # written and closed every step, so a kill loses at most those seconds of TB points.
        self.writer = SummaryWriter(
            str(self.run_dir / "tensorboard"), purge_step=purge, flush_secs=10
        )

    def _truncate(self, resume_step: int) -> None:
        """Keep the lines up to ``resume_step`` (none on a fresh start, ``resume_step`` 0); a
        torn last line (a kill mid-write) is dropped. The file is replaced atomically, so a kill
        here leaves the old or the new file whole."""
        if not self.jsonl.is_file():
            return
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    break  # torn by a kill during the write: that step is rerun anyway
                raise ValueError(f"{self.jsonl}:{i + 1}: not a JSON line ({e})") from None
            if resume_step and row.get("step", 0) <= resume_step:
                keep.append(line)
        tmp = self.jsonl.with_name(self.jsonl.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.jsonl)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._scalars(step, row)
        parts = [fmt.format(row[k]) for k, fmt in SUMMARY_KEYS if isinstance(row.get(k), float)]
        if parts:
            print(f"step {step}: " + " | ".join(parts), flush=True)
        evals = eval_summary(row)
        if evals:
            print(f"eval step {step}: {evals}", flush=True)

    def _scalars(self, step: int, row: dict[str, Any]) -> None:
        """The step's finite numbers as TensorBoard scalars, in one event (one protobuf and one
        record instead of one per metric; readers see the same scalars)."""
        from torch.utils.tensorboard.summary import Summary, scalar

        values = [
            value
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
            for value in scalar(k, float(v)).value
        ]
        if values:
            self.writer._get_file_writer().add_summary(Summary(value=values), step)

    def plot(self, key: str = "reward/mean") -> Path | None:
        """Write ``<run_dir>/reward_curve.png`` from metrics.jsonl (all steps so far): the
        training reward, and each eval set's accuracy at the steps it was evaluated."""
        if not self.enabled or not self.jsonl.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        xs = [r["step"] for r in rows if key in r]
        ys = [r[key] for r in rows if key in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, marker=".", lw=1, label=key)
        if len(ys) >= 5:
            w = 5
            smooth = [
                sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, smooth, lw=2, label="mean of last 5")
        for ek in sorted({k for r in rows for k in r if _is_eval_accuracy(k)}):
            ex = [r["step"] for r in rows if ek in r]
            ax.plot(ex, [r[ek] for r in rows if ek in r], marker="o", lw=1.5, label=ek)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} / held-out accuracy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.run_dir / "reward_curve.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_eval_accuracy(key: str) -> bool:
    """``eval/accuracy`` or ``eval/<set>/accuracy`` (not the per-domain splits)."""
    parts = key.split("/")
    return parts[0] == "eval" and parts[-1] == "accuracy" and len(parts) <= 3 and (
        len(parts) == 2 or not parts[1].startswith("accuracy")
    )


def eval_summary(row: dict[str, Any]) -> str:
    """One console line for the eval metrics in ``row``: per set, accuracy, pass@k, reward,
    length; then the time. Empty when the row holds none."""
    prefixes = sorted({k[: -len("accuracy")] for k in row if _is_eval_accuracy(k)})
    parts = []
    for prefix in prefixes:
        name = prefix[len("eval/") :].rstrip("/")
        head = f"{name}: " if name else ""
        items = [f"{head}accuracy {row[prefix + 'accuracy']:.3f}"]
        items += [
            f"{k[len(prefix):]} {row[k]:.3f}"
            for k in sorted(row)
            if k.startswith(prefix + "pass@") and "/" not in k[len(prefix) :]
        ]
        items += [fmt.format(row[prefix + k]) for k, fmt in EVAL_KEYS if prefix + k in row]
        parts.append(" | ".join(items))
    if parts and isinstance(row.get("time/eval"), float):
        parts.append(f"{row['time/eval']:.1f}s")
    return " | ".join(parts)


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars as Python numbers, for JSON."""
    return v.item() if hasattr(v, "item") else v
