"""The dataset store: one SQLite database holding records, runs, metrics, samples and failures."""
