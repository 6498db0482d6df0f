"""The coordinator: sessions, rounds, timeouts, checkpoints."""
