"""The admin web console (server-rendered pages on the admin listener)."""
