"""Progress bars: their text, when they write, where they write; and that calibration and verification draw them."""

from __future__ import annotations

import io
import sys

import torch
from torch.utils.data import TensorDataset

from pf_ray.config import ExportConfig
from pf_ray.data import DataBundle
from pf_ray.export import export_all, verify_artifact
from pf_ray.progress import ProgressBar, progress_to


def test_bar_text_counts_clamps_and_estimates() -> None:
    lines: list[str] = []
    bar = ProgressBar("work", 4, unit="steps", log=lines.append, interval=0.0)
    bar.update(note="loss 1.0")
    assert lines == [lines[0]] and lines[0].startswith("work [#####...............]  25% 1/4 steps, 0s, ETA ")
    assert lines[0].endswith(", loss 1.0")
    bar.update(10)  # clamped at the total; the last update is left to close()
    assert bar.done == 4 and len(lines) == 1
    bar.close()
    bar.close()  # closing twice shows the end once
    assert lines[1:] == ["work [####################] 100% 4/4 steps, 0s, loss 1.0"]


def test_a_log_gets_a_line_at_most_every_interval() -> None:
    lines: list[str] = []
    with ProgressBar("slow", 1000, log=lines.append, interval=3600.0) as bar:
        for _ in range(999):
            bar.update()
    assert len(lines) == 1 and " 999/1000, " in lines[0]  # only the final state: the interval never passed


def test_bars_are_silent_without_a_destination_and_follow_progress_to(capsys) -> None:
    with ProgressBar("quiet", 2) as bar:
        bar.update(2)
    assert capsys.readouterr() == ("", "")
    lines: list[str] = []
    with progress_to(lines.append):
        with ProgressBar("routed", 2) as bar:
            bar.update(2)
        with progress_to(None), ProgressBar("muted again", 1) as inner:
            inner.update()
    assert lines == ["routed [####################] 100% 2/2, 0s"]


def test_a_terminal_redraws_in_place(monkeypatch) -> None:
    screen = io.StringIO()
    screen.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stdout", screen)
    with ProgressBar("tty", 2, log=print) as bar:
        bar.interval = 0.0
        bar.update()
        bar.update()
    text = screen.getvalue()
    assert text.startswith("\rtty [##########..........]  50% 1/2, ") and text.endswith("100% 2/2, 0s\x1b[K\n")
    assert text.count("\n") == 1  # one line on the screen, redrawn


def test_calibration_and_verification_draw_bars(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    images, labels = torch.randn(600, 1, 8, 8), torch.randint(0, 3, (600,))
    dataset = TensorDataset(images, labels)
    data = DataBundle(name="synthetic", train=dataset, validation=dataset, test=dataset, input_shape=(1, 8, 8),
                      num_classes=3, mean=(0.0,), std=(1.0,))
    lines: list[str] = []
    with progress_to(lines.append):
        paths = export_all(model, data, ExportConfig(formats=("onnx", "onnx_int8"), calibration_samples=64),
                           tmp_path, stem="m")
        verify_artifact(paths["onnx_int8"], model=model, data=data, batch_sizes=(1,), repeats=5)
    assert "  calibrate m.int8.onnx [####################] 100% 2/2 batches, " in "\n".join(lines)
    accuracy = next(line for line in lines if line.startswith("  m.int8.onnx: test accuracy ["))
    assert "100% 3/3 batches" in accuracy and ", accuracy 0." in accuracy  # 600 images in batches of 256
    assert any(line.startswith("  m.int8.onnx: latency b1 [####################] 100% 25/25 runs")
               for line in lines)  # 20 warm-up + 5 timed runs
