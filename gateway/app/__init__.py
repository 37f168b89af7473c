"""The composition root: build the parts from a configuration, run them, supervise worker processes."""
