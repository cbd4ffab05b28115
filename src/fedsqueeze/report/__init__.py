"""Reading results: comparison tables, report.md and plots from results.json files (never runs anything)."""
