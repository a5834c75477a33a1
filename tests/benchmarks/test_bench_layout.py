"""benchmarks/bench_layout.py: the same network in both formats, and its table."""

import torch

from benchmarks.bench_layout import build, main


def test_both_formats_build_the_same_network():
    plain, last = build("reco", channels_last=False), build("reco", channels_last=True)
    assert not plain.hparams.channels_last and last.hparams.channels_last
    for (name, a), (_, b) in zip(plain.state_dict().items(), last.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    conv = next(m for m in last.student.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_table_has_a_row_per_method(capsys):
    assert main(["--methods", "supervised,unimatch", "--crop", "32", "--batch", "2", "--steps", "1",
                 "--warmup", "0", "--threads", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row[1].strip() for row in rows] == ["supervised", "unimatch"]
    for row in rows:
        plain, last, ratio = (float(cell) for cell in row[2:5])
        assert plain > 0 and last > 0 and abs(ratio - last / plain) < 0.01
