"""The `einvoice-gateway` command: one module per command group."""
