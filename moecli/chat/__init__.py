"""`moecli chat`'s conversation loop (repl.py) and its token / expert statistics (stats.py)."""
