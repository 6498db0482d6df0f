"""Asagiri wire protocol: messages, codec, framing, authenticated channel (see protocol/SPEC.md)."""
