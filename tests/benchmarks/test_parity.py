"""benchmarks/parity.py against stand-in "official" code written here (CI cannot fetch the real repositories).

The stand-ins follow ReCo's layout (a ``module_list.py`` at the root) and implement two of its
functions from METHODS.md sections 3-4 in their own way; one variant changes each on purpose.
"""

import subprocess
import textwrap

import pytest

from benchmarks.parity import NotExposed, Official, main

STAND_IN = '''
import numpy as np
import torch
import torch.nn.functional as F


def compute_unsupervised_loss(predict, target, logits, strong_threshold):
    """Per image: confident pixels over {denominator}; times each pixel's CE; mean over pixels with CE > 0."""
    valid = target >= 0
    confident = (logits >= strong_threshold).flatten(1).sum(1)
    share = confident / {denominator_expression}
    pixel_ce = F.cross_entropy(predict, target, ignore_index=-1, reduction="none")
    weighted = share[:, None, None] * pixel_ce
    return weighted[pixel_ce > 0].mean()


def generate_cutout_mask(img_size, ratio=2):
    """Ones with a zero box of {area} of the image, inside it."""
    height, width = img_size
    area = height * width / {area_divisor}
    box_w = np.random.randint(width / ratio + 1, width)
    box_h = int(np.round(area / box_w))
    left = np.random.randint(0, width - box_w + 1)
    top = np.random.randint(0, height - box_h + 1)
    mask = torch.ones(height, width)
    mask[top : top + box_h, left : left + box_w] = 0
    return mask
'''


def write_stand_in(folder, *, changed):
    folder.mkdir()
    source = STAND_IN.format(
        denominator="all pixels" if changed else "valid ones",
        denominator_expression="target[0].numel()" if changed else "valid.flatten(1).sum(1)",
        area="a third" if changed else "half",
        area_divisor="(ratio + 1)" if changed else "ratio",
    )
    (folder / "module_list.py").write_text(textwrap.dedent(source))
    return folder


def run_reco(official, capsys):
    status = main(["--method", "reco", "--official", str(official), "--samples", "300", "--loss-calls", "4"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) == 5 and cells[0] not in ("quantity", "---"):
            rows[cells[0]] = cells
    return status, rows


def test_identical_stand_in_agrees(tmp_path, capsys):
    folder = write_stand_in(tmp_path / "repo", changed=False)
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "module_list.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "stand-in"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()

    status, rows = run_reco(folder / ".git", capsys)  # a git directory: files come from its HEAD
    assert status == 0
    assert rows["confidence-weighted CE: loss"][4] == "match"
    assert rows["confidence-weighted CE: gradient"][4] == "match"
    assert rows["confidence-weighted CE: no valid pixel"][4].startswith("known:")  # NaN vs the suite's 0
    box_rows = [row for name, row in rows.items() if name.startswith("half-area box")]
    assert len(box_rows) == 4 and all(row[4] == "match" for row in box_rows)
    assert rows["EMA"][4].startswith("not exposed")  # the stand-in has no EMA; the section goes on
    assert Official(folder / ".git").commit == commit


def test_changed_stand_in_is_reported(tmp_path, capsys):
    status, rows = run_reco(write_stand_in(tmp_path / "repo", changed=True), capsys)
    assert status == 1
    assert rows["confidence-weighted CE: loss"][4] == "DIFFERS"
    height = rows["half-area box 48x64: box height"]  # a third of the area at the same widths: lower boxes
    assert height[4] == "DIFFERS" and float(height[3].removeprefix("t = ")) > 4
    assert rows["half-area box 48x64: box width"][4] == "match"
    assert Official(tmp_path / "repo").commit.startswith("unknown")


def test_definitions_and_statements_are_read_from_the_file(tmp_path):
    (tmp_path / "helpers.py").write_text("SCALE = 3\n")
    (tmp_path / "train.py").write_text(textwrap.dedent('''
        import math
        from helpers import SCALE
        import not_installed_anywhere

        class Trainer:
            def step(self, x):
                return math.sqrt(x) * self.factor

        def main(values):
            total = 0
            for value in values:
                value = value + 1
                total = total + value * 2
                print("logging that a check must not run")
            return total
    '''))
    official = Official(tmp_path)
    step = official.definitions("train.py", "Trainer.step").step
    assert step(type("Stub", (), {"factor": 2.0})(), 9.0) == 6.0
    run = official.statements("train.py", "value = value + 1", "total = total +")
    assert run({"value": 4, "total": 10})["total"] == 20
    with pytest.raises(NotExposed):
        official.statements("train.py", "value = value + 1", "never = ")
    with pytest.raises(NotExposed):
        official.definitions("train.py", "Trainer.missing")
    with pytest.raises(NotExposed):
        official.file("absent.py")
