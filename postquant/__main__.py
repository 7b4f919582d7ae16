"""``python -m postquant``: the command line (same as the ``postquant`` command)."""

from postquant.cli import app

app(prog_name="postquant")
