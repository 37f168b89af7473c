"""The durable outbox and one sender per destination kind (folder, ERP webhook, partner, e-mail)."""
