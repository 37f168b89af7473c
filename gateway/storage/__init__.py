"""Durable state: invoices, outbox, quarantine, audit log, accounts; the only place SQL is written."""
