"""Tests of guardd.notify: payloads, the outbox and delivery against real receivers."""
