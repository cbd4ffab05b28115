"""Run outputs: results.json, rounds.csv and console tables."""

from fedsqueeze.report.results import ResultsWriter, bpp, summarize

__all__ = ["ResultsWriter", "bpp", "summarize"]
