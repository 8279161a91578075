"""Reports: JSON-safe documents, renderers (rich tables, Markdown, PNG plots) and verdicts."""
