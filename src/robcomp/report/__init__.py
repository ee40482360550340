"""Reports read the store only: a leaderboard table, CSV/JSON exports, and plots."""

from robcomp.report.files import ReportFiles, write_report
from robcomp.report.tables import leaderboard_rows, leaderboard_table

__all__ = ["ReportFiles", "leaderboard_rows", "leaderboard_table", "write_report"]
