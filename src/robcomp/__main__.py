"""``python -m robcomp``: the ``robcomp`` command, for environments without the script on PATH."""

from robcomp.cli import app

app(prog_name="robcomp")
