"""``python -m postquant_lab``: the command line (same as ``postquant``)."""

from postquant_lab.cli import app

app(prog_name="postquant")
