"""The parts of `guardd demo`: real upstreams, a webhook receiver, a private nginx, a live view."""
