"""The run report: report.md / report.html from results.json, and report.html in a real browser."""
