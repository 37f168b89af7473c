"""Trading partners: the allowlist, who a peer is, what a partner may send, and changes to the partners file."""
