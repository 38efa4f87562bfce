"""`python -m core ...`: one module per command, shared argument types and the console helpers."""
