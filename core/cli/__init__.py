"""`python -m core ...`: main.py dispatches to one module per command (train, sample, evaluate, sweep,
bench, report, data, queue, runs); args.py holds the argument groups several commands share, argtypes.py
the value types, console.py Ctrl-C as a clean stop and the progress bar."""
