"""Reports read the store only: a leaderboard table, CSV/JSON exports, and plots."""

from robcomp.report.tables import (
    ReportFiles,
    leaderboard_rows,
    leaderboard_table,
    write_report,
)

__all__ = ["ReportFiles", "leaderboard_rows", "leaderboard_table", "write_report"]
