"""``python -m runners generate ...``: a program entry that starts the CLI of ``entrypoints``.

Nothing imports this module; it only launches the command line (the architecture test names
it as the one program entry inside ``runners``)."""
import runpy

runpy.run_module("entrypoints", run_name="__main__")
