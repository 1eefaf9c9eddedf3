"""mlo.problems: reusable levels and programs built on mlo's core.

``BUNDLED`` names the modules whose import registers the programs that ship with mlo
(`mlo.programs` imports them when `mlo run` looks a program up)."""

BUNDLED: tuple[str, ...] = ("mlo.problems.lfm_cw.cli", "mlo.problems.reweighting", "mlo.problems.hpo", "mlo.problems.maml", "mlo.problems.ignoring")
