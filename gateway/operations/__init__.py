"""Running an instance: init, housekeeping, the admin listener, the audit log's seals, backup."""
