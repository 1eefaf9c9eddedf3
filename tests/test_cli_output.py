"""The command line as people read it: every option's help has a description, a default and its
allowed values; `--help-all` lists every field `--set` takes; results tables in an 80-column pipe
keep whole headers, print "—" where one seed gives no interval, and log lines carry no source
location."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlo import programs
from mlo.cli import main
from mlo.config import ConfigError, describe, option, updated
from mlo.problems import hpo, ignoring, maml, reweighting, runs
from mlo.problems.lfm_cw import cli as lfm_cli
from mlo.problems.lfm_cw.config import RunConfig

CONFIGS = {"reweighting": reweighting.ReweightingConfig, "hpo": hpo.HPOConfig, "ignoring": ignoring.IgnoringConfig,
           "maml": maml.MAMLConfig}


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_option_shows_a_description_its_default_and_allowed_values(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    fields = describe(CONFIGS[name])
    assert [f.name for f in fields if not f.help] == []
    text = "".join(_help(["run", name, "--help"], capsys).split())  # argparse wraps lines, also at hyphens
    for f in fields:
        assert f"--{f.name.replace('_', '-')}" in text
        assert "".join(f"{f.help} (default: {f.default_text})".split()) in text, f.name
    for f in fields:
        if f.choices and not f.kind.startswith("list"):
            assert "{" + ",".join(f.choices) + "}" in text
    if name == "reweighting":
        assert "--setting{noisy,long-tailed}howthetrainingsetiscorrupted" in text


def test_a_value_outside_an_options_choices_is_one_line_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "reweighting", "--setting", "clean"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mlo run: error: flags: option 'setting' must be one of noisy, long-tailed, got 'clean'"


def test_lfm_cw_flags_show_defaults_and_help_all_lists_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    parser = lfm_cli.parser()
    without = {"help", "config", "set", "resume", "help_all"}
    assert [a.dest for a in parser._actions if a.dest not in without and "(default:" not in (a.help or "")] == []
    listing = _help(["run", "lfm-cw", "--help-all"], capsys)
    fields = describe(RunConfig)
    assert len(fields) == len(dataclasses.fields(RunConfig))
    for f in fields:
        assert f"--set {f.name}=" in listing and f.help, f.name
    assert "(no description)" not in listing
    assert "--set lam=FLOAT  (default: 1.0)" in listing
    assert "--help-all" in _help(["run", "hpo", "--help"], capsys)
    assert "--set train_size=INT" in _help(["run", "hpo", "--help-all"], capsys)


def test_one_seed_prints_dashes_not_nan_and_a_narrow_table_keeps_whole_headers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # rich reads the width from it (make readme-figures sets 100)
    metrics = {"test_error": 10.0, "balanced_error": 11.0, "weight_clean": 0.5, "weight_harmful": 0.25, "auc": 0.75}
    result = runs.compare("mlo run demo", ["mwn", "uniform", "class-balanced"], 1, lambda m, s: dict(metrics), None, {},
                          reference="mwn")
    out = capsys.readouterr().out  # not a terminal: rich's 80 columns
    assert result["summary"][1]["paired"]["test_error"]["n"] == 1
    assert "nan" not in out and "+0.00 [—]" in out
    assert "…" not in out
    for header in ("seconds", "test_error", "balanced_error", "weight_harmful", "class-balanced"):
        assert header in out
    assert "runs.py" not in out  # rich's log lines end with no source location
    assert max(len(line) for line in out.splitlines() if "─" in line or "━" in line) <= 80


def test_interval_has_a_dash_for_one_pair_and_numbers_for_several() -> None:
    assert runs.interval(runs.paired_difference([1.0], [2.0])) == "-1.00 [—]"
    assert runs.interval(runs.paired_difference([1.0, 2.0, 4.0], [0.0, 0.0, 0.0])).startswith("+2.33 [")


def test_betty_refusal_gives_the_command_line_remedy_and_the_remedy_works(capsys: pytest.CaptureFixture[str]) -> None:
    from mlo.engines.betty import betty_available

    if not betty_available():
        pytest.skip("betty-ml is not installed")
    for method in ("lfm-cw", "darts-2nd"):  # unroll (no Betty counterpart); finite_difference (Betty's differs)
        assert main(["run", method, "--engine", "betty", "--rounds", "1"]) == 2
        err = capsys.readouterr().err
        assert "--set allow_inexact=true" in err and "allow_inexact=True" not in err
        assert len(err.strip().splitlines()) == 1
    RunConfig(engine="betty", allow_inexact=True, estimator="finite_difference").validate()  # accepted, with a warning


def _batch_statistics_worker(rank: int, folder: str) -> None:
    """Each rank: the warnings and stderr of building an engine with BatchNorm inside and outside
    `batch_statistics_explained`."""
    import contextlib
    import io
    import warnings
    from pathlib import Path

    import torch
    from torch import nn

    import mlo

    def build() -> None:
        module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        batch = torch.ones(4, 2)
        level = mlo.Problem("w", module, torch.optim.SGD(module.parameters(), lr=0.1), [batch], loss=lambda x: module(x).sum())
        mlo.Engine([level], {})

    err = io.StringIO()
    with warnings.catch_warnings(record=True) as seen, contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        with lfm_cli.batch_statistics_explained():
            build()
        inside = [str(w.message) for w in seen]
        build()
    outside = [str(w.message) for w in seen][len(inside):]
    torch.save({"inside": inside, "outside": outside, "stderr": err.getvalue()}, Path(folder) / f"rank{rank}.pt")


def test_under_several_ranks_the_batchnorm_warning_is_explained_once(tmp_path: Path) -> None:
    import torch

    from .helpers import on_two_ranks

    on_two_ranks(_batch_statistics_worker, str(tmp_path / "store"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r["inside"] == []
        assert len(r["outside"]) == 1 and "BatchNorm layer(s)" in r["outside"][0]  # what it hides
    assert ranks[0]["stderr"].count("BatchNorm") == 1 and "2 ranks" in ranks[0]["stderr"]
    assert ranks[1]["stderr"] == ""


@dataclasses.dataclass
class _Example:
    mode: str = option("fast", "how it runs", choices=("fast", "exact"))
    rate: float = 0.1  # the learning rate
    names: list[str] = dataclasses.field(default_factory=lambda: ["a", "b"])


def test_describe_reads_option_and_line_comments_and_updated_checks_choices() -> None:
    fields = {f.name: f for f in describe(_Example)}
    assert (fields["mode"].help, fields["mode"].choices, fields["mode"].default_text) == ("how it runs", ("fast", "exact"), "fast")
    assert (fields["rate"].help, fields["rate"].kind, fields["rate"].choices) == ("the learning rate", "float", None)
    assert (fields["names"].help, fields["names"].default_text) == ("", "a,b")
    assert updated(_Example(), {"mode": "exact"}).mode == "exact"
    with pytest.raises(ConfigError, match=r"option 'mode' must be one of fast, exact, got 'slow'"):
        updated(_Example(), {"mode": "slow"})
