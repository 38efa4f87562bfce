"""Sample quality: the project's feature classifier (classifier.py), the Fréchet distance with its
floor and noise ceiling (frechet.py), `python -m core eval` (cli.py), and the loss per timestep
range (diagnostics.py)."""
