"""Monitoring: Evidently drift and slice reports, alert thresholds and the dashboard."""
