"""Transports: each turns bytes plus a proven peer identity into an InboundMessage."""
