"""The README's Quick start, extracted from README.md and run as printed (at a smaller size)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_code() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Quick start has one python block"
    return blocks[0]


def test_readme_quick_start_runs_as_printed(capsys):
    code = _quick_start_code()
    # the same program at 200 training / 20 test digits (seconds instead of a minute)
    assert code.count("range(1000)") == 1 and code.count("range(100)") == 1
    small = code.replace("range(1000)", "range(200)").replace("range(100)", "range(20)")
    namespace: dict = {"__name__": "__main__"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(small, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    # a new user's first run: CG reaches its tolerance (no non-convergence warning)
    assert not [w for w in caught if "did not converge" in str(w.message)]
    out = capsys.readouterr().out
    assert "torch.Size([200, 20]) torch.Size([200])" in out
    assert "top proponents of test digit 0:" in out
    score, self_inf = namespace["score"], namespace["self_inf"]
    attributor, train_loader = namespace["attributor"], namespace["train_loader"]
    assert torch.isfinite(score).all() and torch.isfinite(self_inf).all()
    # self-influence is the diagonal of the train x train scores, and positive
    # (g_i^T (H + lambda I)^{-1} g_i with a positive definite H + lambda I)
    train_train = attributor.attribute(train_loader, train_loader)
    torch.testing.assert_close(self_inf, train_train.diagonal(), rtol=1e-3, atol=1e-6)
    assert (self_inf > 0).all()
    # the printed model was trained: it classifies the training digits well above chance
    model = namespace["model"]
    x = torch.stack([namespace["train_set"][i][0] for i in range(200)])
    y = torch.tensor([int(namespace["train_set"][i][1]) for i in range(200)])
    assert (model(x).argmax(1) == y).float().mean() > 0.8


def _indented_commands(section: str) -> list[str]:
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_ci_runs_the_readme_test_command_verbatim():
    text = README.read_text()
    setup = text[text.index("## Set-up\n"):text.index("## Quick start\n")]
    commands = _indented_commands(setup)
    test_cmd = next(c for c in commands if "python -m pytest" in c)
    # the test command installs the tests' data: nothing skips for want of it
    assert "apt-get install -y" in test_cmd and "dataset-fashion-mnist" in test_cmd
    assert test_cmd.endswith("python -m pytest && python -m pytest -m slow")
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith(("#", "set ", "cd "))] == [test_cmd]
