"""Progress of a training run: a rich progress bar on a terminal, one plain line per epoch otherwise
(DVC logs, CI)."""

from __future__ import annotations

import sys


class Reporter:
    def __init__(self, name: str, total_epochs: int, steps: int, enabled: bool = True):
        self.name, self.total = name, total_epochs
        self.live = enabled and sys.stderr.isatty()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(name, total=total_epochs * steps, info="")

    def step(self):
        if self.progress:
            self.progress.advance(self.task)

    def epoch(self, row: dict, ips: float):
        # an init-stage epoch is not tested (the student is not trained for the task yet): no test columns
        top5 = f"top5 {row['test_top5']:.2f}% " if "test_top5" in row else ""  # none for 5 classes or fewer
        test = (f"test {row['test_top1']:.2f}% {top5}" if "test_top1" in row else "")
        line = (f"epoch {row['epoch']}/{self.total} [{row['phase']}] lr {row['lr']:.4g} loss {row['train_loss']:.4f} "
                f"train {row['train_top1']:.2f}% {test}{ips:.0f} img/s")
        if self.progress:
            self.progress.update(self.task, info=f"loss {row['train_loss']:.3f} test {row.get('test_top1', 0):.1f}%")
            self.progress.console.print(f"{self.name}: {line}")
        else:
            print(f"{self.name}: {line}", file=sys.stderr, flush=True)

    def close(self):
        if self.progress:
            self.progress.stop()
