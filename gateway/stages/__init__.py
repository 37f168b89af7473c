"""The checks an invoice passes, each a small synchronous stage: parse, schema, signature, facts, rules, fraud, routing, revocation."""
