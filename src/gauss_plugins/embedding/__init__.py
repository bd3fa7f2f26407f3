"""Dynamic embedding tables (filled in below as modules land)."""
