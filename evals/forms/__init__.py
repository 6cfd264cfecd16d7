"""``bsbr-eval forms``: ``command`` (its options and ``main``) and ``forms`` (both forms of an op
built, timed and written)."""
