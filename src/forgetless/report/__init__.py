"""Reports: the retention report every method is judged by."""

from forgetless.report.retention import build_retention_report, render_markdown, write_report

__all__ = ["build_retention_report", "render_markdown", "write_report"]
