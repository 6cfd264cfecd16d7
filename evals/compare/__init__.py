"""``bsbr-eval compare``: ``command`` (its options and ``main``) and ``sweep`` (the cases measured
one by one, or as Ray tasks, into a claimed CSV)."""
