"""What README.md tells a new user to run works as it says."""

import inspect
import math
import re

import pytest
from helpers import REPO

import came_optax

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The text of README's section ``## title``, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def test_sixty_second_example_trains(capsys):
    """The example runs as printed and its loss falls from log(10) (zero params, 10 classes)."""
    (code,) = re.findall(r"```python\n(.*?)```", section("60-second example"), re.S)
    exec(compile(code, "README.md (60-second example)", "exec"), {})
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert len(losses) == 6
    assert losses[0] == pytest.approx(math.log(10), abs=1e-3)
    assert losses[-1] < 0.6  # about 0.4 with the default float32 arithmetic


def test_test_command_is_ci_command_and_shows_skip_reasons():
    """README's whole-suite test commands are the one CI runs, and say why tests are skipped."""
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"python -m pytest [^\n`]*--doctest-modules[^\n`]*", README + ci)
    assert len(commands) >= 3, commands  # README's two and CI's
    assert len(set(commands)) == 1, commands
    assert "-rs" in commands[0].split()


def test_came_defaults_are_came_pytorch_defaults():
    """The migration notes say ``came()``'s defaults are came-pytorch 0.1.3's."""
    came_pytorch = pytest.importorskip("came_pytorch")
    theirs = {
        name: p.default for name, p in inspect.signature(came_pytorch.CAME).parameters.items()
    }
    ours = {name: p.default for name, p in inspect.signature(came_optax.came).parameters.items()}
    assert (ours["b1"], ours["b2"], ours["b3"]) == theirs["betas"]
    assert (ours["eps1"], ours["eps2"]) == theirs["eps"]
    assert ours["clip_threshold"] == theirs["clip_threshold"]
    assert ours["weight_decay"] == theirs["weight_decay"]
    assert ours["mask"] is None and ours["debias"] is False
