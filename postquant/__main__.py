"""``python -m postquant`` (and ``torchrun -m postquant``): runs the command line, which lives in the lab
package (`postquant_lab.cli`: it knows the zoo's named models). Importing `postquant` never loads it."""

from postquant_lab.cli import app

app(prog_name="postquant")
