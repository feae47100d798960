"""`edvit dashboard`: the app (app.py), its command (cli.py) and static files (static/)."""
