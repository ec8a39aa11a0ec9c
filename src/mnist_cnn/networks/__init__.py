"""Networks: the built-in ones by name, the searchable family among them (builtin), any network by
reference, file or module (reference), and what a designer asks of one: per-layer summary and the
checks (summary). Knows nothing of training."""
