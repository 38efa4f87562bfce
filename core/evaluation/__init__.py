"""Sample quality: the project's feature classifier (classifier.py), the Fréchet distance with its
floor and noise ceiling (frechet.py), scoring a run (scoring.py), and the loss per timestep
range (diagnostics.py). `python -m core eval` is core/cli/evaluate.py."""
