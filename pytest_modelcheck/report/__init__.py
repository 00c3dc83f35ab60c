"""Renderers for check results: terminal tables and JSON (no computation here)."""
