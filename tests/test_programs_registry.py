"""`mlo run NAME` finds programs through `mlo.programs`: bundled ones, ones registered with a
decorator, and ones another package declares in the ``mlo.programs`` entry-point group."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlo import programs
from mlo.cli import main
from mlo.config import ConfigError


@dataclass
class _Config:
    rounds: int = 3
    lr: float = 0.1
    names: list[str] | None = None
    verbose: bool = False

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")


RAN: list[_Config] = []


@programs.program("test-toy", "a toy program of the registry tests", _Config, aliases=("test-toy-alias",))
def _toy(config: _Config) -> None:
    RAN.append(config)


def test_run_help_lists_every_registered_program(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("lfm-cw", "test-toy"):
        assert f"  {name} " in out
    assert "a toy program of the registry tests (also: test-toy-alias)" in out


def test_a_program_gets_its_config_from_flags_set_and_toml(tmp_path: Path) -> None:
    RAN.clear()
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.5\nnames = ["a", "b"]\n')
    assert main(["run", "test-toy-alias", "--config", str(toml), "--rounds", "7", "--set", "verbose=true"]) == 0
    assert RAN == [_Config(rounds=7, lr=0.5, names=["a", "b"], verbose=True)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "x"], "option 'rounds' must be int, got 'x'"),
        (["--set", "nope=1"], "unknown option 'nope'"),
        (["--set", "rounds"], "--set expects KEY=VALUE, got 'rounds'"),
        (["--rounds", "0"], "rounds must be >= 1, got 0"),
    ],
)
def test_bad_options_are_refused_before_the_program_runs(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    RAN.clear()
    assert main(["run", "test-toy", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlo run: error: ") and message in err and len(err.splitlines()) == 1 and RAN == []


def test_unknown_program_and_taken_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-program"]) == 2
    assert "unknown program 'no-such-program'; programs: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="program name 'darts' is already taken by program 'lfm-cw'"):
        programs.register("other", "clashes", aliases=("darts",))(lambda name, argv: 0)


def test_a_package_adds_a_program_through_the_entry_point_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_mlo_program.py").write_text(
        "from mlo import programs\n"
        "@programs.register('from-a-package', 'registered by an installed package')\n"
        "def main(name, argv):\n"
        "    return 7\n"
    )
    info = tmp_path / "my_mlo_program-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-mlo-program\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mlo.programs]\nfrom-a-package = my_mlo_program\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        programs.discover(again=True)
        assert "from-a-package" in programs.names()
        assert main(["run", "from-a-package"]) == 7
    finally:
        sys.modules.pop("my_mlo_program", None)


@programs.program("test-toy-checked", "a toy program mlo check can check", _Config,
                  engine=lambda config: _ridge_engine(config.rounds, config.lr))
def _toy_checked(config: _Config) -> None:
    RAN.append(config)


def _ridge_engine(rounds: int, lr: float) -> "mlo.Engine":
    import torch

    import mlo
    from mlo.problems.ridge import Ridge, program

    g = torch.Generator().manual_seed(0)
    ridge = Ridge.random(20, 3, generator=g)
    engine = mlo.Engine(program(ridge, torch.zeros(3), torch.zeros(3), lower_lr=lr), {"hyper": ["weights"]}, "cg")
    engine.run(rounds)
    return engine


def test_a_config_program_with_an_engine_is_checked_with_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    RAN.clear()
    assert main(["check", "test-toy-checked", "--rounds", "2", "--set", "lr=0.05", "--warn-above", "inf"]) == 0
    assert "mlo check: hypergradient of 'hyper'" in capsys.readouterr().out and RAN == []
    assert main(["check", "test-toy-checked", "--rounds", "0"]) == 2  # validated before the engine is built
    assert "mlo check: error: rounds must be >= 1, got 0" in capsys.readouterr().err
    assert main(["check", "test-toy"]) == 2  # registered without an engine
    assert "registers no engine to check" in capsys.readouterr().err
