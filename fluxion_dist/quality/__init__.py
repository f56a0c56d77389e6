"""Quality harness: a small long-context model trained on synthetic tasks, and the evaluation of
decode attention policies on it (task accuracy, attention-mass recall, output error, budget)."""
